"""CLI options that no other test runs, each checked by its effect: --optimizer, --no-amp, --workers
(pretrain and finetune's shared training options), --overlap and --memory-mb (predict, suggest),
--min-gap (suggest)."""

import json
import sys

import numpy as np
import pytest
import torch

from MedSSL.commands.cli import main
from MedSSL.data.phantom import make_phantom
from MedSSL.engine import acceleration
from MedSSL.engine.acceleration import mixed_precision, precision_name
from MedSSL.engine import sliding_window as sliding
from MedSSL.io.volumes import write_volume
from MedSSL.tasks import pretrain as pretrain_module
from MedSSL.engine.loop import TrainingLoop

torch.set_num_threads(1)
TINY = ["--width", "4", "--patch", "16", "16", "8", "--batch-size", "2", "--cubes-per-volume", "4",
        "--device", "cpu", "--progress", "none", "--seed", "2"]


@pytest.fixture(scope="module")
def volumes(small_phantoms):
    return small_phantoms


def loops(monkeypatch):
    """Every TrainingLoop built from now on (to look at its optimiser and configuration)."""
    built = []
    real = TrainingLoop.__init__

    def __init__(self, *args, **kwargs):
        real(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(TrainingLoop, "__init__", __init__)
    return built


@pytest.mark.parametrize("name,cls,state_key", [("adam", torch.optim.Adam, "exp_avg"),
                                                ("adamw", torch.optim.AdamW, "exp_avg"),
                                                ("sgd", torch.optim.SGD, "momentum_buffer")])
def test_optimizer_option_picks_the_optimiser(name, cls, state_key, volumes, tmp_path, monkeypatch):
    built = loops(monkeypatch)
    out = tmp_path / name
    assert main(["pretrain", "--data", str(volumes), "--out", str(out), "--cache", str(tmp_path / "cache"), *TINY,
                 "--steps", "2", "--optimizer", name]) == 0
    assert type(built[0].optimizer) is cls
    state = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    assert state and all(state_key in s for s in state.values())
    assert json.loads((out / "model.json").read_text(encoding="utf-8"))["training"]["optimizer"] == name


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_no_amp_turns_mixed_precision_off(volumes, tmp_path, monkeypatch):
    """The option reaches the loop, whose autocast it disables: on CUDA (checked with a CUDA device that
    need not exist: nothing runs on it) and on a CPU with native bf16 (probe patched); a CPU without it
    trains in fp32 either way."""
    built = loops(monkeypatch)
    for extra, amp in (([], True), (["--no-amp"], False)):
        assert main(["pretrain", "--data", str(volumes), "--out", str(tmp_path / f"amp{amp}"), "--cache",
                     str(tmp_path / "cache"), *TINY, "--patch", "24", "16", "8", "--steps", "1", *extra]) == 0
        assert built[-1].config.amp is amp
    # 3D inputs under 24 voxels along X train in fp32 on the CPU (oneDNN's bf16 weight gradients there)
    assert main(["pretrain", "--data", str(volumes), "--out", str(tmp_path / "small"), "--cache",
                 str(tmp_path / "cache"), *TINY, "--steps", "1"]) == 0
    assert built[-1].config.amp is False
    cpu = torch.device("cpu")
    assert acceleration.amp_for_inputs(cpu, True, [(24, 16, 8)]) and acceleration.amp_for_inputs(cpu, True, [(16, 16)])
    assert not acceleration.amp_for_inputs(cpu, True, [(64, 64, 32), (16, 32, 16)])
    assert acceleration.amp_for_inputs(torch.device("cuda"), True, [(16, 16, 8)])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    context, scaler = mixed_precision(cuda, enabled=True)
    assert isinstance(context, torch.autocast) and scaler is None  # bf16: no grad scaler
    context, scaler = mixed_precision(cuda, enabled=False)
    assert not isinstance(context, torch.autocast) and scaler is None
    for native in (True, False):
        monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda native=native: native)
        context, scaler = mixed_precision(cpu, enabled=True)
        assert isinstance(context, torch.autocast) is native and scaler is None
        assert precision_name(cpu, True) == ("bfloat16 autocast" if native else "fp32")
        assert not isinstance(mixed_precision(cpu, enabled=False)[0], torch.autocast)


def test_workers_prefetch_in_threads_and_keep_the_run_reproducible(volumes, tmp_path, monkeypatch):
    started = []
    real = pretrain_module.Prefetcher.__init__

    def __init__(self, next_batch, workers=1, depth=2):
        started.append(workers)
        real(self, next_batch, workers=workers, depth=depth)

    monkeypatch.setattr(pretrain_module.Prefetcher, "__init__", __init__)
    models = {}
    for workers in ("0", "1", "2"):
        out = tmp_path / f"w{workers}"
        assert main(["pretrain", "--data", str(volumes), "--out", str(out), "--cache", str(tmp_path / "cache"), *TINY,
                     "--steps", "4", "--workers", workers]) == 0
        models[workers] = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert started == [1, 2]  # --workers 0: no loader thread
    # one loader thread hands the batches over in the order they were drawn: the same run as none
    assert all(torch.equal(models["0"][k], models["1"][k]) for k in models["0"])


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """A width-4 segmentation bundle fine-tuned on dense labels (the network path), and its image. Its 3 steps
    are enough for a map with both background and liver (checked where agreement is tested)."""
    root = tmp_path_factory.mktemp("segmenter")
    phantom = make_phantom(0, shape=(32, 32, 24), spacing=(6.0, 6.0, 8.0))
    write_volume(phantom.image, root / "ct.nii.gz")
    labels = phantom.labels.array.copy()
    labels[labels > 1] = 0
    write_volume(phantom.labels.with_array(labels), root / "liver.nii.gz")
    assert main(["finetune", "--image", str(root / "ct.nii.gz"), "--label", str(root / "liver.nii.gz"), "--out",
                 str(root / "bundle"), "--width", "4", "--patch", "16", "16", "8", "--steps", "3", "--batch-size", "2",
                 "--device", "cpu", "--progress", "none"]) == 0
    return root


def spy_sliding_window(monkeypatch):
    """The overlap and memory target of every sliding-window run (wherever ``run_slabs`` was imported)."""
    import MedSSL.tasks.infer.predict  # noqa: F401  (loaded, so their imported name can be replaced)
    import MedSSL.tasks.infer.suggest  # noqa: F401

    seen = []
    real = sliding.run_slabs

    def run_slabs(*args, **kwargs):
        seen.append({"overlap": kwargs.get("overlap"), "memory_mb": kwargs.get("memory_mb")})
        return real(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("MedSSL") and getattr(module, "run_slabs", None) is real:
            monkeypatch.setattr(module, "run_slabs", run_slabs)
    return seen


def test_predict_overlap_and_memory_mb(segmenter, tmp_path, monkeypatch, capsys):
    """--overlap changes the blended probabilities; --memory-mb reaches the sliding window and, however small,
    leaves the labels as they were."""
    from MedSSL.io.volumes import read_volume

    seen = spy_sliding_window(monkeypatch)
    base = ["predict", "--model", str(segmenter / "bundle"), "--image", str(segmenter / "ct.nii.gz"),
            "--device", "cpu", "--progress", "none"]

    def predict(name, *extra):
        assert main([*base, "--out", str(tmp_path / f"{name}.nii.gz"), "--probabilities",
                     str(tmp_path / f"{name}_p.nii.gz"), *extra]) == 0
        return read_volume(tmp_path / f"{name}.nii.gz").array, read_volume(tmp_path / f"{name}_p.nii.gz").array

    labels, probabilities = predict("default")
    assert 0.02 < (labels == 1).mean() < 0.98  # both classes: an all-one-class map would agree with anything
    assert seen[-1] == {"overlap": 0.5, "memory_mb": 1024.0}  # the bundle's overlap, the default target
    _, overlapped = predict("overlap", "--overlap", "0.75")
    assert seen[-1]["overlap"] == 0.75
    assert np.abs(overlapped.astype(np.float32) - probabilities.astype(np.float32)).max() > 1e-3
    small, _ = predict("small", "--memory-mb", "0.05")
    assert seen[-1]["memory_mb"] == 0.05
    assert (small == labels).mean() > 0.99 and (small == 1).sum() > 0
    assert main([*base, "--out", str(tmp_path / "c.nii.gz"), "--overlap", "0.99"]) == 2
    assert "--overlap" in capsys.readouterr().err


def test_suggest_min_gap_and_memory_mb(segmenter, tmp_path, monkeypatch, capsys):
    seen = spy_sliding_window(monkeypatch)
    base = ["suggest", "--model", str(segmenter / "bundle"), "--image", str(segmenter / "ct.nii.gz"), "--count", "4",
            "--device", "cpu", "--progress", "none"]
    picks = {}
    for gap in (1, 5):
        assert main([*base, "--min-gap", str(gap), "--memory-mb", "0.05" if gap == 5 else "1024"]) == 0
        picks[gap] = [s["index"] for s in json.loads(capsys.readouterr().out)["slices"]]
    assert [call["memory_mb"] for call in seen] == [1024.0, 0.05]
    assert len(picks[5]) == 4
    assert all(abs(a - b) >= 5 for i, a in enumerate(picks[5]) for b in picks[5][i + 1:]), picks[5]
    # the scores are smooth along Z: without a gap the top 4 include neighbours (the gap changes the pick)
    assert min(abs(a - b) for i, a in enumerate(picks[1]) for b in picks[1][i + 1:]) < 5, picks[1]
    assert main([*base, "--min-gap", "0"]) == 2
