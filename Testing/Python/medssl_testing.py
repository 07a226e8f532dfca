"""Small helpers shared by the test files (importable because pytest puts this folder on sys.path)."""

import time
from pathlib import Path

import torch

from MedSSL.models.genesis_unet import GenesisUNet


def official_checkpoint(path: Path, width: int = 32, seed: int = 0) -> dict:
    """Write a file laid out like Genesis_Chest_CT.pt (epoch, state_dict with 'module.' keys,
    optimizer_state_dict); returns the state dict written."""
    torch.manual_seed(seed)
    state = {f"module.{k}": v for k, v in GenesisUNet(width=width).state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}}, path)
    return state


PUBLISHED_KEYS = Path(__file__).resolve().parents[2].parent / "shared" / "research" / "genesis_state_dict_keys.json"


def published_genesis_checkpoint(path: Path, width: int = 4, seed: int = 0) -> dict:
    """Write a Genesis_Chest_CT.pt-shaped file whose key names, order, dtypes and shapes are those of the
    official release (../shared/research/genesis_state_dict_keys.json: width 32), every channel count
    scaled to ``width``, with random values (BatchNorm variances positive). Without the shared folder the
    names come from MedSSL's own GenesisUNet (as :func:`official_checkpoint`). Returns the state written
    ('module.' keys)."""
    import json

    if not PUBLISHED_KEYS.is_file():
        return official_checkpoint(path, width=width, seed=seed)
    published = json.loads(PUBLISHED_KEYS.read_text(encoding="utf-8"))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in published["keys"]:
        size = [d * width // 32 if d >= 32 else d for d in shape]  # channels scale; kernels and 1 channel stay
        if dtype == "int64":
            value = torch.tensor(3, dtype=torch.int64)
        elif key.endswith("running_var"):
            value = torch.rand(size, generator=generator) + 0.5
        else:
            value = torch.randn(size, generator=generator) * 0.1
        state[published["prefix"] + key] = value
    torch.save({"epoch": 7, "state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}}, path)
    return state


def record_initial_state(monkeypatch) -> dict:
    """The trained model's state when training starts (after --init), captured from the training loop:
    filled in when a run starts (a copy of every tensor, weights and BatchNorm statistics)."""
    from MedSSL.engine.loop import TrainingLoop

    seen = {}
    real = TrainingLoop.run

    def run(self, *args, **kwargs):
        seen.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrainingLoop, "run", run)
    return seen


def check_ark_teacher_update(method, first_batch, second_batch) -> None:
    """Ark's teacher (the whole multi-head model) is a copy of the student at the first step and then an
    EMA of it (momentum 0.9 at step 1 of 4); the loss is (1 - c) task + c consistency with c(0) = 0 and
    c = 0.25 at step 2 of 4. Shared by the 3D and the 2D Ark tests."""
    import pytest

    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    loss, parts = method.training_loss(first_batch, torch.Generator().manual_seed(0))
    assert parts["c"] == 0.0 and float(loss.detach()) == pytest.approx(parts["task"], rel=1e-6)

    def teacher():
        return [p.detach().clone() for p in method.teacher.parameters()]

    def student():
        return [p.detach().clone() for p in (*method.backbone.parameters(), *method.heads.parameters())]

    assert all(torch.equal(a, b) for a, b in zip(teacher(), student()))
    opt.zero_grad()
    loss.backward()
    opt.step()
    t0, s1 = teacher(), student()
    method.after_step(1, 4)
    for a, b, s in zip(teacher(), t0, s1):
        assert torch.allclose(a, 0.9 * b + 0.1 * s, rtol=0, atol=1e-6)
    method.after_step(2, 4)
    loss, parts = method.training_loss(second_batch, torch.Generator().manual_seed(0))
    assert parts["c"] == pytest.approx(0.25)
    assert float(loss.detach()) == pytest.approx(0.75 * parts["task"] + 0.25 * parts["consistency"], rel=1e-5)


class StepClock:
    """A stand-in for the ``time`` module of the training loop (``monkeypatch.setattr(loop_module, "time",
    StepClock())``) whose ``monotonic()`` advances ``tick`` seconds per call: a ``--max-time`` budget then
    ends after a fixed number of loop iterations on any machine, however loaded. Other ``time`` functions
    are the real ones."""

    def __init__(self, tick: float = 1.0):
        self.now, self.tick = 0.0, tick

    def monotonic(self) -> float:
        self.now += self.tick
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)
