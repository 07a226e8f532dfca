"""Issue 19 item 10, Slicer side: an Apple-silicon Mac is offered its GPU (MPS) and not told to buy an NVIDIA
one, and the backend's child processes get torch's per-operation CPU fallback for MPS."""

from slicer_testing_helpers import ENVIRONMENT

MAC = dict(ENVIRONMENT, cuda=[], mps=True)


def test_children_get_the_mps_cpu_fallback(monkeypatch):
    from MedSSLCommonLib import backend

    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    assert backend.childEnvironment()["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"


def test_a_mac_is_offered_its_gpu(slicer_app):
    from MedSSLCommonLib import gui

    assert gui.deviceChoices(MAC) == [("auto", "auto (Apple GPU, MPS)"), ("mps", "mps (Apple GPU)"),
                                      ("cpu", "cpu (slow)")]
    assert gui.deviceWarning(MAC, "auto") == "" and gui.deviceWarning(MAC, "mps") == ""
    assert "CPU" in gui.deviceWarning(MAC, "cpu")
    assert gui.environmentSummary(MAC).endswith("; Apple GPU (MPS).")
    assert gui.deviceChoices(dict(ENVIRONMENT, cuda=[], mps=False))[0] == ("auto", "auto (CPU: no GPU found - slow)")
