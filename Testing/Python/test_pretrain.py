"""Pretraining end to end on phantoms: bundle contents, progress lines, budgets, resume, locking,
crash safety (SIGKILL then --resume), torchrun with two CPU processes, and no paths in artifacts."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from MedSSL.io.bundle import load_bundle, read_meta
from MedSSL.commands.cli import main
from MedSSL.data.phantom import make_phantom
from MedSSL.io.volumes import write_volume
from MedSSL.engine import loop as loop_module
from MedSSL.engine.runtime import OutputLock
from medssl_testing import StepClock, published_genesis_checkpoint, record_initial_state

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
TINY = ["--width", "4", "--patch", "32", "32", "16", "--batch-size", "2", "--cubes-per-volume", "6", "--device", "cpu"]


@pytest.fixture(scope="module")
def volumes(large_phantoms):
    return large_phantoms


def pretrain_args(volumes, out, cache, *extra):
    return ["pretrain", "--data", str(volumes), "--out", str(out), "--cache", str(cache), *TINY, "--seed", "1", *extra]


def test_pretrain_writes_a_complete_bundle(volumes, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(pretrain_args(volumes, out, tmp_path / "cache", "--steps", "12", "--val-every", "4", "--progress", "json")) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    steps = [line for line in lines if line["event"] == "progress" and line["stage"] == "pretrain"]
    assert steps[-1]["step"] == 12 and steps[-1]["total"] == 12
    assert {"loss", "lr", "eta_s", "cubes_per_s"} <= set(steps[-1])
    assert lines[-1] == {"event": "done", "bundle": str(out)}
    meta, state = load_bundle(out)
    assert meta["architecture"] == {"name": "unet3d", "width": 4, "in_channels": 1, "out_channels": 1, "spatial_dims": 3}
    assert meta["method"]["name"] == "genesis" and meta["task"] == "pretrain"
    assert meta["patch_size"] == [32, 32, 16] and meta["world_size"] == 1
    assert meta["preprocessing"]["intensity"]["ct_window"] == [-1000.0, 1000.0]
    assert meta["data_summary"]["volumes"] == 3 and meta["training"]["steps"] == 12
    assert any("val_loss" in record for record in meta["history"])
    assert "backbone.down_tr64.ops.0.conv1.weight" in state
    text = (out / "model.json").read_text(encoding="utf-8")
    assert str(volumes) not in text and "case_" not in text


def test_max_time_stops_early(volumes, tmp_path, monkeypatch):
    """--max-time ends the run by the loop's clock, here a StepClock (1 s per read), so the stop does not
    depend on the machine's speed: stopped by time, before --steps, at the same step in two runs."""
    stops = []
    for name in ("a", "b"):
        monkeypatch.setattr(loop_module, "time", StepClock())
        out = tmp_path / name
        assert main(pretrain_args(volumes, out, tmp_path / "cache", "--steps", "50", "--max-time", "10",
                                  "--progress", "none")) == 0
        training = read_meta(out)["training"]
        stops.append((training["stopped_by"], training["steps"]))
    assert stops[0] == stops[1] and stops[0][0] == "time" and 1 <= stops[0][1] < 50, stops


def test_resume_continues_and_existing_runs_are_protected(volumes, tmp_path, capsys):
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    assert main(pretrain_args(volumes, out, cache, "--steps", "6", "--checkpoint-every", "3", "--progress", "none")) == 0
    assert main(pretrain_args(volumes, out, cache, "--steps", "6", "--progress", "none")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(pretrain_args(volumes, out, cache, "--steps", "10", "--resume", "--progress", "json")) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"event": "log", "message": "resumed from step 6"} in lines
    first_step = next(line["step"] for line in lines if line["event"] == "progress" and line["stage"] == "pretrain")
    assert first_step == 7
    assert read_meta(out)["training"]["steps"] == 10


def test_a_second_run_on_the_same_output_is_refused(volumes, tmp_path, capsys):
    out = tmp_path / "busy"
    with OutputLock(out):
        assert main(pretrain_args(volumes, out, tmp_path / "cache", "--steps", "2", "--progress", "none")) == 2
    assert "another MedSSL run" in capsys.readouterr().err
    assert not (out / "model.json").exists()


def test_init_from_official_checkpoint(volumes, tmp_path, monkeypatch):
    official = published_genesis_checkpoint(tmp_path / "Genesis_Chest_CT.pt", width=4, seed=5)
    seen = record_initial_state(monkeypatch)
    out = tmp_path / "from_pt"
    assert main(pretrain_args(volumes, out, tmp_path / "cache", "--steps", "2", "--init", str(tmp_path / "Genesis_Chest_CT.pt"), "--progress", "none")) == 0
    assert read_meta(out)["training"]["init"] == {"source": "official-pt", "width": 4}
    # every U-Net tensor (weights and BatchNorm statistics) starts as the file's, 'module.' prefix removed
    for key, value in official.items():
        assert torch.equal(seen["backbone." + key[len("module."):]], value), key


def test_init_from_a_bundle_starts_from_its_weights(volumes, tmp_path, monkeypatch):
    first = tmp_path / "first"
    assert main(pretrain_args(volumes, first, tmp_path / "cache", "--steps", "2", "--progress", "none")) == 0
    _, state = load_bundle(first)
    seen = record_initial_state(monkeypatch)
    out = tmp_path / "second"
    assert main(pretrain_args(volumes, out, tmp_path / "cache", "--steps", "2", "--init", str(first), "--progress", "none")) == 0
    assert read_meta(out)["training"]["init"]["source"] == "bundle"
    backbone = [k for k in state if k.startswith("backbone.")]
    assert backbone and all(torch.equal(seen[k], state[k]) for k in backbone)
    # the same seed without --init starts elsewhere
    fresh = record_initial_state(monkeypatch)
    assert main(pretrain_args(volumes, tmp_path / "third", tmp_path / "cache", "--steps", "1", "--progress", "none")) == 0
    assert not torch.equal(fresh["backbone.down_tr64.ops.0.conv1.weight"], state["backbone.down_tr64.ops.0.conv1.weight"])


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "MedSSL", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(volumes, tmp_path):
    """Event-driven: the run is killed as soon as it reports a step after its first checkpoint (no sleep, so
    a fast or a loaded machine alike kill it mid-run); resumed, it ends with the weights, Adam moments and
    losses of an uninterrupted run of the same seed and --steps (bit for bit on the CPU: the checkpoint
    carries the model, the optimiser and the random streams; restarting any of them fails it)."""
    out, cache = tmp_path / "killed", tmp_path / "cache"
    args = pretrain_args(volumes, out, cache, "--steps", "12", "--checkpoint-every", "2", "--progress", "json")
    child = _run_cli(args)
    try:
        for line in child.stdout:  # progress lines are flushed one by one
            event = json.loads(line)
            # the step-2 checkpoint is written right after the step-2 report, before step 3 starts
            if event["event"] == "progress" and event["stage"] == "pretrain" and event["step"] >= 3:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert (out / "checkpoint.pt").exists() and not (out / "model.json").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= saved < 12
    resumed = _run_cli(pretrain_args(volumes, out, cache, "--steps", "12", "--checkpoint-every", "2", "--resume",
                                     "--progress", "json"))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert {"event": "log", "message": f"resumed from step {saved}"} in lines
    assert read_meta(out)["training"]["steps"] == 12
    whole = tmp_path / "whole"
    assert main(pretrain_args(volumes, whole, cache, "--steps", "12", "--checkpoint-every", "2", "--progress", "none")) == 0
    ended, expected = (torch.load(folder / "checkpoint.pt", weights_only=True) for folder in (out, whole))
    assert ended["step"] == expected["step"] == 12
    assert ended["model"].keys() == expected["model"].keys()
    assert all(torch.equal(ended["model"][k], expected["model"][k]) for k in expected["model"]), \
        [k for k in expected["model"] if not torch.equal(ended["model"][k], expected["model"][k])][:5]
    for a, b in zip(ended["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert [r["loss"] for r in read_meta(out)["history"]] == [r["loss"] for r in read_meta(whole)["history"]]


RANK_WEIGHTS = """
import sys, torch
from MedSSL.engine import loop as loop_module
from MedSSL.engine.loop import TrainingLoop
real = TrainingLoop.run
def run(self, *args, **kwargs):
    result = real(self, *args, **kwargs)
    torch.save({k: p.detach().cpu() for k, p in self.model.named_parameters()}, sys.argv[1] + f".rank{self.ctx.rank}.pt")
    return result
TrainingLoop.run = run
from MedSSL.commands.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_torchrun_two_cpu_processes(volumes, tmp_path):
    """Two ranks end with identical parameters (gradients are averaged; ranks that trained on their own shards
    without syncing differ, they even start from different seeds), and the result differs from one process."""
    out = tmp_path / "ddp"
    script = tmp_path / "rank_weights.py"
    script.write_text(RANK_WEIGHTS, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = pretrain_args(volumes, out, tmp_path / "cache", "--steps", "4", "--device", "cpu", "--progress", "none")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "ddp"), *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-8000:]  # the rank's own message comes before torchrun's summary
    meta = read_meta(out)
    assert meta["world_size"] == 2 and meta["training"]["steps"] == 4
    rank0 = torch.load(tmp_path / "ddp.rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp.rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert main(pretrain_args(volumes, tmp_path / "one", tmp_path / "cache", "--steps", "4", "--progress", "none")) == 0
    _, alone = load_bundle(tmp_path / "one")  # one process, same seed and steps (best = last: one validation)
    key = "backbone.down_tr64.ops.0.conv1.weight"
    assert not torch.equal(alone[key], rank0[key])


def test_a_time_only_budget_warms_up_and_decays_within_the_time(volumes, tmp_path, monkeypatch):
    """--max-time without --steps: the schedule follows the clock (not 10**9 steps of warm-up). The loop's
    clock advances 0.05 s per reading (3 a step): 4 s is about 26 steps on any machine."""
    monkeypatch.setattr(loop_module, "time", StepClock(0.05))
    out = tmp_path / "clock"
    assert main(pretrain_args(volumes, out, tmp_path / "cache", "--max-time", "4", "--progress", "none")) == 0
    training = read_meta(out)["training"]
    assert training["stopped_by"] == "time" and 20 <= training["steps"] <= 30
    lrs = [record["lr"] for record in read_meta(out)["history"]]
    assert max(lrs) > 0.9e-3  # reached the peak (1e-3) after the warm-up (2 % of the time: 0.08 s, the 1st step)
    assert lrs[-1] < 0.1 * max(lrs)  # and decayed to near the floor by the end of the budget


def test_lr_schedule_by_step_and_by_time():
    from MedSSL.engine.loop import LoopConfig, lr_factor

    config = LoopConfig(steps=100, warmup=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(100, config) == pytest.approx(config.min_lr_ratio)
    assert lr_factor(0, config, fraction=0.05) == pytest.approx(0.5)
    assert lr_factor(0, config, fraction=1.0) == pytest.approx(config.min_lr_ratio)


def test_torchrun_finetune_two_cpu_processes(tmp_path):
    """Fine-tuning under torchrun: both ranks end with identical parameters (gradients averaged), as in
    pretraining, and the bundle records world_size 2."""
    phantom = make_phantom(0, shape=(48, 48, 24), spacing=(4.0, 4.0, 6.0))
    write_volume(phantom.image, tmp_path / "ct.nii.gz")
    painted = phantom.labels.array.copy()
    painted[painted > 1] = 0
    painted[:, :, 1::3] = 255
    write_volume(phantom.labels.with_array(painted), tmp_path / "painted.nii.gz")
    out = tmp_path / "ddp_ft"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "rank_weights.py"
    script.write_text(RANK_WEIGHTS, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "ddp_ft"), "finetune", "--engine", "network", "--image", str(tmp_path / "ct.nii.gz"), "--label", str(tmp_path / "painted.nii.gz"),
           "--out", str(out), "--width", "4", "--patch", "32", "32", "16", "--steps", "4", "--device", "cpu",
           "--progress", "none"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-8000:]
    meta = read_meta(out)
    assert meta["world_size"] == 2 and meta["task"] == "segment"
    rank0 = torch.load(tmp_path / "ddp_ft.rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp_ft.rank1.pt", weights_only=True)
    assert rank0 and rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_method_settings_are_checked_before_any_data_is_read(tmp_path, capsys):
    """An unknown key or an invalid value of --method-settings is a one-line error naming it, given before
    the (here missing) data is looked at; the view_* keys are accepted."""
    missing = str(tmp_path / "no-such-volume.nii.gz")
    for settings, expected in (('{"view_nope": 1}', "unknown setting(s) for caid: view_nope"),
                               ('{"momentum": 2}', "momentum must be in [0, 1)"),
                               ('{"view_local_rate": 2}', "local_rate must be a probability")):
        assert main(["pretrain", "--data", missing, "--method", "caid", "--method-settings", settings,
                     "--out", str(tmp_path / "out"), "--device", "cpu", "--progress", "none"]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
