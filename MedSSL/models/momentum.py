"""Exponential-moving-average (momentum) teachers, one implementation for every method that has one
(MoCo's key encoder in DiRA/CAiD, Adam-v2's DINO teacher, Ark's multi-head teacher), and MoCo's queue.

* :func:`update_momentum`: ``teacher <- m * teacher + (1 - m) * student``, parameters only (as MoCo and
  DINO: a teacher's BatchNorm statistics come from its own forward passes).
* :func:`copy_weights`: the teacher becomes an exact copy (parameters and buffers).
* :class:`MomentumEncoder`: a teacher made of copies of a Genesis U-Net's encoder stages and a head.
* :class:`TeacherUpdates`: when the teacher is copied and updated: copied from the student at the first
  training step (not at construction, so ``--init`` weights are copied too), then updated once per
  optimiser step, by the trainer's ``after_step`` or, when the trainer never calls it, at the start of
  the next training step (never twice).
* :class:`FeatureQueue`: MoCo's FIFO dictionary of negative keys.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from MedSSL.errors import MedSSLError


@torch.no_grad()
def update_momentum(student: Iterable[torch.Tensor], teacher: Iterable[torch.Tensor], momentum: float) -> None:
    """``t <- m * t + (1 - m) * s`` for matching tensors of two equally long lists (in place on ``teacher``)."""
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise RuntimeError("momentum teacher and student do not match")
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, [s.detach().to(t.dtype) for t, s in zip(teacher, student)], alpha=1.0 - momentum)


@torch.no_grad()
def copy_weights(student: Iterable[nn.Module], teacher: Iterable[nn.Module]) -> None:
    """Copy the parameters and buffers of the ``student`` modules into the ``teacher`` modules, in order."""
    student, teacher = list(student), list(teacher)
    for t, s in zip([p for m in teacher for p in m.parameters()], [p for m in student for p in m.parameters()]):
        t.copy_(s.detach())
    for t, s in zip([b for m in teacher for b in m.buffers()], [b for m in student for b in m.buffers()]):
        t.copy_(s)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with gradients off (a teacher)."""
    out = copy.deepcopy(module)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def encoder_modules(backbone: nn.Module) -> list[nn.Module]:
    """The four encoder stages of a GenesisUNet, in order."""
    return [backbone.down_tr64, backbone.down_tr128, backbone.down_tr256, backbone.down_tr512]


class MomentumEncoder(nn.Module):
    """EMA teacher of a U-Net encoder and a head: ``stages`` (copies of the four encoder stages) and
    ``head``, gradients off. ``forward``: (N, C, X, Y, Z) (or (N, C, X, Y)) -> head of the bottleneck."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList(frozen_copy(m) for m in encoder_modules(backbone))
        self.head = frozen_copy(head)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *S) -> the bottleneck (N, 16w, *S / 8)."""
        for stage in self.stages:
            x, _ = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

    @staticmethod
    def student_modules(backbone: nn.Module, head: nn.Module) -> list[nn.Module]:
        return [*encoder_modules(backbone), head]

    def update(self, backbone: nn.Module, head: nn.Module, momentum: float) -> None:
        """Every parameter <- ``m * teacher + (1 - m) * student``."""
        student = [p for m in self.student_modules(backbone, head) for p in m.parameters()]
        update_momentum(student, self.parameters(), momentum)

    def copy_from(self, backbone: nn.Module, head: nn.Module) -> None:
        """Become an exact copy of the student's encoder and head."""
        copy_weights(self.student_modules(backbone, head), [*self.stages, self.head])


class TeacherUpdates:
    """The once-per-step protocol of an EMA teacher (see the module docstring).

    ``owner`` holds the bool buffer ``ready_buffer`` (kept in checkpoints: a resumed run does not copy
    again); ``copy()`` makes the teacher a copy of the student, ``update(m)`` moves it by momentum m.
    A method calls :meth:`before_training_step` and :meth:`after_training_step` around its training
    loss and :meth:`after_optimizer_step` from its ``after_step``.
    """

    def __init__(self, owner: nn.Module, copy: Callable[[], None], update: Callable[[float], None],
                 ready_buffer: str = "teacher_ready"):
        self.owner, self.copy, self.update, self.ready_buffer = owner, copy, update, ready_buffer
        self.pending = False

    @property
    def ready(self) -> bool:
        return bool(getattr(self.owner, self.ready_buffer))

    def before_training_step(self, momentum: Callable[[], float]) -> None:
        """First step: copy the student. Later: the update the trainer did not ask for, with ``momentum()``."""
        if not self.ready:
            self.copy()
            getattr(self.owner, self.ready_buffer).fill_(True)
        elif self.pending:
            self.update(momentum())
        self.pending = False

    def after_training_step(self) -> None:
        self.pending = True

    def after_optimizer_step(self, momentum: Callable[[], float]) -> None:
        if self.pending:
            self.update(momentum())
            self.pending = False


class FeatureQueue(nn.Module):
    """FIFO queue of ``size`` L2-normalised ``dim``-vectors (MoCo's dictionary of negatives).

    A ring buffer: :meth:`enqueue` writes the new keys at ``ptr`` (wrapping round the end) and moves
    ``ptr`` on, so the oldest keys are the ones overwritten. ``filled`` counts real keys (at most
    ``size``). As in MoCo the initial entries are random unit vectors, used as negatives until they
    are overwritten. Buffers, so checkpoints and resume keep the queue.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        if size < 1:
            raise MedSSLError("queue size must be >= 1")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("queue", F.normalize(torch.randn(self.size, self.dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Add (N, dim) keys (the newest ``size`` of them when N > size)."""
        keys = keys.detach().to(self.queue.dtype)
        if keys.shape[0] > self.size:  # more keys than room: only the newest fit
            keys = keys[-self.size:]
        n = keys.shape[0]
        idx = (int(self.ptr) + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[idx] = keys
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def negatives(self) -> torch.Tensor:
        """(size, dim) negatives (a clone, so later enqueues do not change a graph that uses them)."""
        return self.queue.clone().detach()
