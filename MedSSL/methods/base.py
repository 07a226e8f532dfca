"""The one interface every self-supervised method implements, and the registry the trainer reads.

A method is an ``nn.Module`` that owns the transferable 3D U-Net (``self.backbone``, a
:class:`~MedSSL.models.genesis_unet.GenesisUNet`) plus whatever heads, teachers or queues it needs. The trainer
knows no method names: it asks the registry for a class, builds it, calls :meth:`SSLMethod.training_loss`
on batches of cubes, :meth:`SSLMethod.after_step` after each optimiser step, and saves
``backbone`` (keys ``backbone.*``) plus the method's other parameters in the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from MedSSL.methods import settings as method_settings
from MedSSL.models.genesis_unet import GenesisUNet

_REGISTRY: dict[str, type["SSLMethod"]] = {}



@dataclass
class PretrainData:
    """What the trainer hands a method to build its batches from.

    train / val: CubeSets of preprocessed cubes ((X, Y, Z) float in [0, 1], memory-mapped), or None for
    methods whose ``data_kind`` is not "cubes". sources: the volume files/DICOM folders (never written
    to bundles). settings: the CubeSettings used. datasets: the parsed ``--datasets`` spec for methods
    that learn from labelled datasets. cache_dir: where methods may cache what they derive.
    """

    train: Any = None
    val: Any = None
    sources: list = field(default_factory=list)
    settings: Any = None
    datasets: dict | None = None
    cache_dir: Path | None = None
    seed: int = 0
    log: Callable[[str], None] = print
    rank: int = 0
    world_size: int = 1

    def shard(self, n: int) -> np.ndarray:
        """Indices 0..n-1 that belong to this torchrun rank (all of them without torchrun)."""
        own = np.arange(self.rank, n, self.world_size)
        return own if len(own) else np.arange(n)


@dataclass(frozen=True)
class NoSettings:
    """Settings of a method that has none."""


class SSLMethod(nn.Module):
    """Base class. Subclasses set ``name``, ``description`` and ``Settings``, build their own modules in
    :meth:`build_modules` and implement the loss.

    Batches are (N, 1, X, Y, Z) float tensors in [0, 1] on the training device (X, Y, Z = the patch,
    slice axis last). ``Settings`` is a frozen, validated dataclass (:mod:`MedSSL.methods.settings`);
    the JSON ``settings`` given to the constructor override its defaults, and ``self.settings`` is the
    resulting instance, recorded flat in the bundle. ``defaults`` (the flat JSON defaults) is derived
    from it.

    2D: a method with ``supports_2d = True`` built through :func:`build_method` with ``spatial_dims=2``
    gets a 2D backbone (``GenesisUNet(spatial_dims=2)``, same keys, 2D kernels) and (N, 1, X, Y) batches
    cut from one-slice images (``self.spatial_dims`` says which).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    #: the flat JSON defaults of ``Settings`` (derived, for ``medssl methods`` and --method-settings)
    defaults: ClassVar[dict] = {}
    #: what the method was published with and how we differ (for ``medssl methods`` and the README)
    published: ClassVar[str] = ""

    def __init__(self, width: int = 32, in_channels: int = 1, settings: dict | None = None,
                 spatial_dims: int = 3):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if spatial_dims == 2 and not self.supports_2d:
            raise ValueError(f"method {self.name} has no 2D variant")
        unknown = method_settings.unknown_keys(self.Settings, settings or {})
        if unknown:
            raise ValueError(f"unknown setting(s) for method {self.name}: {', '.join(unknown)}")
        self.settings = method_settings.from_json(self.Settings, settings)
        self.spatial_dims = spatial_dims
        self.backbone = GenesisUNet(in_channels=in_channels, out_channels=in_channels, width=width,
                               spatial_dims=self.spatial_dims)
        self.build_modules()

    def build_modules(self) -> None:
        """Build the method's own modules and buffers (heads, teachers, queues) from ``self.settings`` and
        ``self.backbone`` (``width``, ``in_channels``, ``bottleneck_channels``). Called once, at the end
        of the constructor, so that methods need no constructor of their own. Default: nothing."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.defaults = method_settings.defaults(cls.Settings)

    #: "cubes" (unlabeled cubes from --data) or "labelled-datasets" (from --datasets SPEC.json)
    data_kind: ClassVar[str] = "cubes"
    #: True when the method also runs on one-slice images with a 2D backbone and (N, 1, X, Y) batches
    supports_2d: ClassVar[bool] = False
    #: True for a method without validation: the default batches are drawn from the validation cubes too
    trains_on_validation_data: ClassVar[bool] = False

    def setup(self, data: PretrainData) -> None:
        """Called by the trainer once the data is known, before the optimiser is built and before a
        checkpoint is resumed: build modules whose shapes depend on the data here (Ark's per-dataset
        heads). Default: nothing."""

    def batch_source(self, data: PretrainData, batch_size: int, rng: np.random.Generator,
                     device: torch.device) -> Callable[[], Any]:
        """A function returning one training batch per call. Default: ``batch_size`` random cubes as a
        (N, 1, X, Y, Z) float tensor on ``device`` ((N, 1, X, Y) for a 2D method). Methods needing
        pseudo-labels or views override. With ``trains_on_validation_data`` the validation cubes are drawn
        from as well."""
        cubes = data.train
        if self.trains_on_validation_data and data.val is not None and len(data.val):
            val = data.val
            cubes = type(cubes)(cubes.files + val.files, cubes.infos + val.infos, cubes.selections + val.selections)
        own = data.shard(len(cubes))

        def next_batch() -> torch.Tensor:
            idx = np.sort(rng.choice(own, size=batch_size))
            return self.as_batch(cubes.get(idx)).to(device, non_blocking=True)

        return next_batch

    def as_batch(self, cubes: np.ndarray) -> torch.Tensor:
        """(n, X, Y, Z) cubes -> (n, 1, X, Y, Z) tensor; (n, 1, X, Y) for a 2D method (Z must be 1)."""
        x = torch.from_numpy(np.ascontiguousarray(cubes)).unsqueeze(1)
        if self.spatial_dims == 2:
            if x.shape[-1] != 1:
                raise ValueError(f"a 2D method needs one-slice cubes, got {tuple(cubes.shape[1:])}")
            x = x[..., 0]
        return x

    def validation_batches(self, data: PretrainData, batch_size: int, device: torch.device, limit: int = 8) -> list:
        """Fixed validation batches (the same every check). Default: the first cubes of ``data.val``."""
        if data.val is None or len(data.val) == 0:
            return []
        n = min(len(data.val), batch_size * limit)
        return [self.as_batch(data.val.get(np.arange(i, min(i + batch_size, n)))).to(device)
                for i in range(0, n, batch_size)]

    def training_loss(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Scalar loss to minimise and a dict of named float components for the log.

        ``batch`` is what :meth:`batch_source` returns (by default (N, 1, X, Y, Z) cubes in [0, 1]).
        """
        raise NotImplementedError

    def input_sizes(self, patch: tuple) -> list[tuple]:
        """The spatial sizes (voxels) of the inputs the backbone sees in training: by default the patch;
        a method with smaller views (Adam's local crops) adds them. Read to choose the precision."""
        return [tuple(patch)]

    def transferable_state_dict(self) -> dict:
        """What the bundle stores: the whole method state (the U-Net under ``backbone.*``)."""
        return self.state_dict()

    def forward(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Same as :meth:`training_loss`, so a DistributedDataParallel wrapper syncs its gradients."""
        return self.training_loss(batch, generator)

    @torch.no_grad()
    def validation_loss(self, batch, generator: torch.Generator) -> float:
        """Loss on a validation batch (same objective, no gradient). Override when it differs."""
        loss, _ = self.training_loss(batch, generator)
        return float(loss)

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step (momentum teachers, queues, schedules). Default: nothing."""

    def describe(self) -> dict:
        """The bundle's ``method`` entry: name plus settings (flat JSON)."""
        return {"name": self.name, **method_settings.to_json(self.settings)}

    def bundle_meta(self) -> dict:
        """model.json fields that replace the trainer's (default: none). A method whose bundle is not a
        plain pretraining bundle returns e.g. ``task``, ``classes``, ``channels`` and an
        ``architecture`` dict (merged key by key into the trainer's). Called after
        :meth:`transferable_state_dict`, whose tensors must match what it declares."""
        return {}


def register(cls: type[SSLMethod]) -> type[SSLMethod]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def build_method(cls: type[SSLMethod], width: int = 32, settings: dict | None = None,
                 spatial_dims: int = 3) -> SSLMethod:
    """``cls(width=width, settings=settings)`` with a backbone of ``spatial_dims`` (2 only for methods
    with ``supports_2d``; ValueError otherwise)."""
    return cls(width=width, settings=settings, spatial_dims=spatial_dims)


def method_class(name: str) -> type[SSLMethod]:
    """The registered class for ``name``; KeyError lists the known names."""
    from MedSSL.methods import load_all

    load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def available_methods() -> list[type[SSLMethod]]:
    from MedSSL.methods import load_all

    load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
