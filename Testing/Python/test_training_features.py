"""Training features checked by their effect, not their metadata: the bundle keeps the best-validation
weights, patience stops a run, and an interrupted and resumed run ends where an uninterrupted one does
(genesis, and CAiD with its momentum teacher and queue). --init is checked in test_pretrain.py and
test_finetune.py; --optimizer, --no-amp and --workers in test_cli_options.py; --debug in test_cli.py."""

import json

import pytest
import torch

from MedSSL.io.bundle import load_bundle, read_meta
from MedSSL.commands.cli import main
from MedSSL.methods.base import method_class
from MedSSL.engine.loop import TrainingLoop

torch.set_num_threads(1)
TINY = ["--width", "4", "--patch", "16", "16", "8", "--batch-size", "2", "--cubes-per-volume", "4",
        "--device", "cpu", "--progress", "none"]


@pytest.fixture(scope="module")
def volumes(small_phantoms):
    return small_phantoms


def pretrain(volumes, out, cache, *extra):
    return main(["pretrain", "--data", str(volumes), "--out", str(out), "--cache", str(cache), *TINY, "--seed", "3", *extra])


def checkpoint(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def same(a: dict, b: dict, prefix="") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return all(torch.equal(a[k], b[k]) for k in keys)


# --------------------------------------------------------------------------------------------------
# validation: best weights and patience
# --------------------------------------------------------------------------------------------------


REAL_VALIDATE = TrainingLoop._validate


def scripted_validation(monkeypatch, values):
    """Genesis' validation loss returns ``values`` in turn, one per check (each check averages the
    validation batches, which all get the same value)."""
    calls = iter(values)
    current = {}

    def validation_loss(self, batch, generator):
        return current["value"]

    def _validate(self, validate_fn):
        current["value"] = next(calls)
        return REAL_VALIDATE(self, validate_fn)

    monkeypatch.setattr(method_class("genesis"), "validation_loss", validation_loss)
    monkeypatch.setattr(TrainingLoop, "_validate", _validate)


def test_the_bundle_keeps_the_best_validation_weights(volumes, tmp_path, monkeypatch):
    """Checks at steps 2, 4, 6, 8: the second is best, so the bundle holds the step-4 weights, not the
    last ones (a loop keeping the last weights fails)."""
    scripted_validation(monkeypatch, [0.5, 0.1, 0.3, 0.4])
    out = tmp_path / "best"
    assert pretrain(volumes, out, tmp_path / "cache", "--steps", "8", "--val-every", "2", "--patience", "0",
                    "--checkpoint-every", "4") == 0
    meta, state = load_bundle(out)
    assert meta["training"]["best_val_loss"] == pytest.approx(0.1) and meta["training"]["steps"] == 8
    assert [r["val_loss"] for r in meta["history"] if "val_loss" in r] == pytest.approx([0.5, 0.1, 0.3, 0.4])
    final = checkpoint(out)
    assert same(state, final["best_state"], "backbone.")
    assert not same(state, final["model"], "backbone.")  # 4 more steps moved the weights


def test_patience_stops_the_run_after_that_many_checks_without_improvement(volumes, tmp_path, monkeypatch, capsys):
    scripted_validation(monkeypatch, [0.5, 0.2, 0.3, 0.25, 0.9, 0.1, 0.1])
    out = tmp_path / "patient"
    assert pretrain(volumes, out, tmp_path / "cache", "--steps", "14", "--val-every", "2", "--patience", "3",
                    "--progress", "json") == 0
    training = read_meta(out)["training"]
    # best at check 2 (step 4); checks 3, 4, 5 do not improve: stop at step 10 of 14
    assert training["stopped_by"] == "early-stopping" and training["steps"] == 10
    assert training["best_val_loss"] == pytest.approx(0.2)
    assert "early stopping: no validation improvement in 3 checks" in capsys.readouterr().out
    # --patience 0 is off: the same values run all 14 steps
    scripted_validation(monkeypatch, [0.5, 0.2, 0.3, 0.25, 0.9, 0.1, 0.1])
    assert pretrain(volumes, tmp_path / "impatient", tmp_path / "cache", "--steps", "14", "--val-every", "2",
                    "--patience", "0") == 0
    assert read_meta(tmp_path / "impatient")["training"]["steps"] == 14


# --------------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_after_checkpoint(monkeypatch, step):
    """The run dies right after writing the checkpoint of ``step`` (as a killed process would)."""
    real = TrainingLoop._checkpoint

    def _checkpoint(self):
        real(self)
        if self.step == step:
            raise Crash(f"killed after step {step}")

    monkeypatch.setattr(TrainingLoop, "_checkpoint", _checkpoint)


@pytest.mark.parametrize("method,settings,extra", [
    ("genesis", {}, []),
    # CAiD: a momentum teacher (copied at the first step), a 64-key queue filled 2 keys a step, loss weights
    ("caid", {"queue_size": 64, "embedding_dim": 16}, ["--batch-size", "2"]),
])
def test_an_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(method, settings, extra, volumes,
                                                                            tmp_path, monkeypatch):
    """On CPU the resumed run matches bit for bit: the weights, the optimiser (Adam moments), the method's
    state (teacher, queue, pointer) and the random streams (batches, transforms) all continue. Fresh weights,
    a fresh optimiser, a fresh teacher/queue or restarted random streams each fail it."""
    args = ["--method", method, "--method-settings", json.dumps(settings), "--steps", "8", "--checkpoint-every", "4",
            "--val-every", "100", *extra]
    assert pretrain(volumes, tmp_path / "whole", tmp_path / "cache", *args) == 0
    whole = checkpoint(tmp_path / "whole")
    with monkeypatch.context() as patch:
        crash_after_checkpoint(patch, 4)
        with pytest.raises(Crash):
            pretrain(volumes, tmp_path / "resumed", tmp_path / "cache", *args)
    assert checkpoint(tmp_path / "resumed")["step"] == 4
    assert pretrain(volumes, tmp_path / "resumed", tmp_path / "cache", *args, "--resume") == 0
    resumed = checkpoint(tmp_path / "resumed")
    assert resumed["step"] == whole["step"] == 8
    assert same(resumed["model"], whole["model"])  # every parameter and buffer: U-Net, teacher, queue
    if method == "caid":
        assert int(whole["model"]["queue.filled"]) == 16
    for a, b in zip(resumed["optimizer"]["state"].values(), whole["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in whole["history"]]
