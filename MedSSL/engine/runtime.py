"""Where a job runs: device choice, torchrun process groups, the output-folder lock, seeding."""

from __future__ import annotations

import fcntl
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from MedSSL.errors import MedSSLError


def mps_available() -> bool:
    """True when torch can use the Apple GPU (Metal Performance Shaders) of this Mac."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> CUDA when available, else the Apple GPU (MPS) when available, else CPU; "cuda" or "mps" without
    that GPU is an error. On MPS, operations torch lacks there run on the CPU one by one when the process was
    started with ``PYTORCH_ENABLE_MPS_FALLBACK=1`` (the Slicer modules set it for their child processes)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedSSLError(f"--device {name}: no CUDA GPU is available to this Python (torch {torch.__version__})")
    if name == "mps" and not mps_available():
        raise MedSSLError(f"--device mps: no Apple GPU (MPS) is available to this Python (torch {torch.__version__})")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise MedSSLError(f"--device {name}: expected auto, cpu, cuda or mps")
    return torch.device(name)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DistributedContext:
    """rank / world size of this process; world_size 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """Average a float over all ranks (identity without torchrun)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank (so all ranks stop at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world, local), device


class OutputLock:
    """An exclusive lock on an output folder, so two runs cannot write the same ``--out``.

    Uses ``flock`` on ``<out>/.medssl.lock``: the kernel releases it when the process dies, even by
    SIGKILL, so a crashed run never blocks ``--resume``.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".medssl.lock"
        self._handle = None
        self._created: list[Path] = []  # folders this run made (outermost first), for clean-up on failure
        self._created_lock = False

    def __enter__(self) -> "OutputLock":
        try:
            missing = []
            folder = self.path.parent.absolute()
            while not folder.exists() and folder != folder.parent:
                missing.append(folder)
                folder = folder.parent
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._created = list(reversed(missing))
            self._created_lock = not self.path.exists()
            self._handle = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise MedSSLError(f"{self.path.parent}: cannot write to the output folder ({exc.strerror})") from None
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise MedSSLError(f"{self.path.parent}: another MedSSL run is writing to this output folder") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._handle is not None:
            if exc_type is not None:
                self._remove_what_was_created()
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()

    def _remove_what_was_created(self) -> None:
        """A run that failed (e.g. refused for bad input) leaves nothing it made: its lock file and the
        output folders it created, when they hold nothing else. Done while still holding the lock."""
        if self._created_lock:
            try:
                self.path.unlink()
            except OSError:
                pass
        for folder in reversed(self._created):  # innermost first
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
