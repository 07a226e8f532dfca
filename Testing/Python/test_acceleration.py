"""How training networks are prepared: channels-last on the CPU (and on CUDA when asked), the precision
recorded in the bundle; a failing torch.compile falls back to eager."""

import torch
import torch.nn.functional as F
from torch import nn

from MedSSL.io.bundle import read_meta
from MedSSL.commands.cli import main
from MedSSL.data.phantom import make_phantom
from MedSSL.io.volumes import write_volume
from MedSSL.engine.acceleration import compile_with_fallback, precision_name, prepare_batch, prepare_for_training
from MedSSL.models.genesis_unet import GenesisUNet

torch.set_num_threads(1)


def test_channels_last_pretraining(tmp_path, capsys):
    write_volume(make_phantom(0, shape=(48, 48, 24), spacing=(4.0, 4.0, 6.0)).image, tmp_path / "a.nii.gz")
    assert main(["pretrain", "--device", "cpu", "--data", str(tmp_path / "a.nii.gz"), "--out", str(tmp_path / "b"), "--cache", str(tmp_path / "c"),
                 "--width", "4", "--patch", "32", "32", "16", "--batch-size", "2", "--steps", "3", "--channels-last",
                 "--progress", "none"]) == 0
    training = read_meta(tmp_path / "b")["training"]
    assert training["steps"] == 3
    # 32 x 32 x 16 cubes: bf16 autocast where the CPU computes it natively, else fp32
    assert training["precision"] == precision_name(torch.device("cpu"), True)
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


def test_training_networks_are_channels_last_on_the_cpu_only_where_it_pays():
    conv = "down_tr64.ops.1.conv1.weight"  # 2 input channels: the layouts differ
    net = GenesisUNet(1, 2, 2)
    amp, channels_last = prepare_for_training(net, torch.device("cpu"), 3, [(16, 16, 8)], True, False, print)
    assert channels_last and amp is False  # 16 voxels along X: fp32 on the CPU (see amp_for_inputs)
    assert net.state_dict()[conv].is_contiguous(memory_format=torch.channels_last_3d)
    assert not net.state_dict()[conv].is_contiguous()
    flat = GenesisUNet(1, 2, 2, spatial_dims=2)  # 2D networks keep their layout
    assert not prepare_for_training(flat, torch.device("cpu"), 2, [(16, 16)], True, False, print)[1]
    cuda_net = GenesisUNet(1, 2, 2)  # CUDA only with --channels-last (nothing runs on the device here)
    assert prepare_for_training(cuda_net, torch.device("cuda"), 3, [(16, 16, 8)], True, False, print) == (True, False)
    assert cuda_net.state_dict()[conv].is_contiguous()
    # the same network: only the memory layout differs
    x = torch.rand(1, 1, 16, 16, 8)
    plain = GenesisUNet(1, 2, 2).eval()
    plain.load_state_dict(net.state_dict())
    assert torch.allclose(plain(x), net.eval()(x), atol=1e-5)


def test_compile_from_the_cli_is_used_and_recorded(tmp_path, monkeypatch):
    """`pretrain --compile` compiles the U-Net: dynamo traces it during training (a counting backend stands
    in for inductor, whose C++ build of a first step takes about a minute on a CPU) and the bundle records
    "torch.compile"; without --compile nothing is traced and the record is null; a backend that fails
    falls back to eager mode, with a log line and the reason recorded, and the run still finishes."""
    import json

    from MedSSL.commands.cli import main
    from MedSSL.data.phantom import make_phantom
    from MedSSL.io.bundle import read_meta
    from MedSSL.io.volumes import write_volume

    for seed in range(2):
        write_volume(make_phantom(seed, shape=(32, 32, 16), spacing=(6.0, 6.0, 8.0)).image, tmp_path / f"p{seed}.nii.gz")
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    real_compile = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: real_compile(self, backend=counting))

    def pretrain(out, *extra):
        torch._dynamo.reset()
        return main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / out), "--cache", str(tmp_path / "cache"),
                     "--width", "4", "--patch", "16", "16", "8", "--batch-size", "2", "--cubes-per-volume", "4",
                     "--steps", "2", "--device", "cpu", "--progress", "json", *extra])

    assert pretrain("plain") == 0 and not graphs
    assert read_meta(tmp_path / "plain")["training"]["compile"] is None
    assert pretrain("compiled", "--compile") == 0 and graphs
    assert read_meta(tmp_path / "compiled")["training"]["compile"] == "torch.compile"

    def failing(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: real_compile(self, backend=failing))
    assert pretrain("fallback", "--compile") == 0
    record = read_meta(tmp_path / "fallback")["training"]["compile"]
    assert record.startswith("eager (") and "no C++ compiler found" in record, record
    torch._dynamo.reset()
