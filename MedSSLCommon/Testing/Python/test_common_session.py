"""The live-session client (MedSSLCommonLib/session.py) against the real backend (``python -m MedSSL session``)
on the phantom: start, planes, a full update, a correction that returns only the changed box, resync, save,
errors, close. Also: importing the client pulls in neither torch nor the engine."""

import os
import subprocess
import sys

import numpy as np
import pytest

from MedSSLCommonLib.session import FewShotSessionClient, SessionError, decodeLabels, encodeLabels

LIVER = 1


@pytest.fixture
def phantom_files(tmp_path):
    from MedSSL.data.phantom import make_phantom, write_phantom

    phantom = make_phantom(0, shape=(64, 64, 40))
    image, _, _ = write_phantom(phantom, tmp_path)
    return image, (phantom.labels.array == LIVER).astype(np.uint8)


def test_client_imports_neither_torch_nor_the_engine():
    code = ("import sys; from MedSSLCommonLib.session import FewShotSessionClient; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'MedSSL')))")
    here = os.path.dirname(os.path.abspath(__file__))
    common = os.path.abspath(os.path.join(here, "..", ".."))
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=common,
                           env={**os.environ, "PYTHONPATH": common})
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


def test_payload_round_trip():
    array = (np.arange(120) % 7).astype(np.uint8).reshape(4, 5, 6)
    np.testing.assert_array_equal(decodeLabels(encodeLabels(array)), array)


def test_client_runs_a_live_session_on_the_phantom(real_backend, phantom_files, tmp_path):
    image, truth = phantom_files
    events = []
    client = FewShotSessionClient(image, device="cpu", steps=60, onEvent=events.append)
    with client:
        assert client.shape == truth.shape and client.startSeconds > 0
        client.setPlanes(2, {k: truth[..., k] for k in (3, 10, 18)})
        first = client.update()
        assert first.mode == "full" and first.latency > 0
        assert any(e.get("event") == "log" for e in events)  # the engine's progress reached onEvent
        inside = client.labels > 0
        assert 2.0 * (inside & (truth > 0)).sum() / (inside.sum() + truth.sum()) > 0.85
        before = client.labels.copy()
        client.setPlanes(2, {7: truth[..., 7]})
        second = client.update()
        assert second.mode == "incremental" and second.slices == list(range(4, 10))
        box = tuple(slice(a, b) for a, b in second.box)
        assert second.labels.shape == client.labels[box].shape
        outside = np.ones(truth.shape, bool)
        outside[box] = False
        np.testing.assert_array_equal(before[outside], client.labels[outside])
        kept = client.labels.copy()
        client.result()  # resynchronise from the session's own copy: the same labels
        np.testing.assert_array_equal(kept, client.labels)
        with pytest.raises(SessionError, match="plane 7 along axis 2: shape"):
            client.setPlanes(2, {7: np.zeros((3, 3), np.uint8)})
        assert client.running  # a bad command does not end the session
        client.save(tmp_path / "model")
        assert (tmp_path / "model" / "model.json").is_file()
    assert client.process is None
    with pytest.raises(SessionError, match="not running"):
        client.update()


def test_client_reports_the_backends_reason_when_the_session_cannot_start(real_backend, tmp_path):
    client = FewShotSessionClient(tmp_path / "missing.nrrd", device="cpu")
    with pytest.raises(SessionError, match="medssl: error: .*missing.nrrd"):
        client.start()
    client.close()
