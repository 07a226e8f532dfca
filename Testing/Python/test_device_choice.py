"""Issue 19 item 10: the device choice. "auto" uses CUDA, else the Apple GPU (MPS), else the CPU; "mps" without
an Apple GPU is a one-line error (the Slicer side, MedSSLCommon/Testing/Python/test_common_device.py, offers
MPS and starts children with torch's per-operation CPU fallback). The GPUs are simulated (this suite runs on
a CPU-only machine)."""

import pytest
import torch

from MedSSL.engine import runtime
from MedSSL.errors import MedSSLError


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert runtime.resolve_device("auto").type == expected


def test_mps_explicitly(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    device = runtime.resolve_device("mps")
    assert device.type == "mps" and runtime.device_description(device) == "mps (Apple GPU)"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(MedSSLError, match=r"^--device mps: no Apple GPU \(MPS\) is available"):
        runtime.resolve_device("mps")
    with pytest.raises(MedSSLError, match="expected auto, cpu, cuda or mps"):
        runtime.resolve_device("tpu")
