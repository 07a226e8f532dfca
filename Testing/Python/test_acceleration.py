"""GPU-path options on CPU: channels-last pretraining works; a failing torch.compile falls back to eager."""

import torch
import torch.nn.functional as F
from torch import nn

from MedSSL.io.bundle import read_meta
from MedSSL.commands.cli import main
from MedSSL.data.phantom import make_phantom
from MedSSL.io.volumes import write_volume
from MedSSL.engine.acceleration import compile_with_fallback, prepare_batch

torch.set_num_threads(1)


def test_channels_last_pretraining(tmp_path, capsys):
    write_volume(make_phantom(0, shape=(48, 48, 24), spacing=(4.0, 4.0, 6.0)).image, tmp_path / "a.nii.gz")
    assert main(["pretrain", "--device", "cpu", "--data", str(tmp_path / "a.nii.gz"), "--out", str(tmp_path / "b"), "--cache", str(tmp_path / "c"),
                 "--width", "4", "--patch", "32", "32", "16", "--batch-size", "2", "--steps", "3", "--channels-last",
                 "--progress", "none"]) == 0
    assert read_meta(tmp_path / "b")["training"]["steps"] == 3
    batch = prepare_batch(torch.rand(2, 1, 8, 8, 8), channels_last=True)
    assert batch.is_contiguous(memory_format=torch.channels_last_3d)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    module = nn.Linear(3, 2)

    def broken_compile(self, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler found")

        self._compiled_call_impl = fail

    monkeypatch.setattr(nn.Module, "compile", broken_compile)
    logs = []
    compile_with_fallback(module, logs.append)
    x = torch.rand(4, 3)
    assert torch.equal(module(x), F.linear(x, module.weight, module.bias))
    assert torch.equal(module(x), F.linear(x, module.weight, module.bias))
    assert len(logs) == 1 and "running eagerly" in logs[0]


def test_prefetcher_keeps_the_order_and_passes_errors_on():
    import pytest

    from MedSSL.engine.prefetch import Prefetcher

    counter = iter(range(100))
    prefetch = Prefetcher(lambda: next(counter), workers=1, depth=3)
    assert [prefetch() for _ in range(10)] == list(range(10))
    prefetch.close()

    def broken():
        raise ValueError("unreadable cube")

    failing = Prefetcher(broken)
    with pytest.raises(ValueError, match="unreadable cube"):
        failing()
    failing.close()
