# Over 300 lines: the bundle files and BundleMeta, the typed model.json they hold with its checks, change together.
"""Model bundles: the unit users share. A directory with ``weights.safetensors`` and ``model.json``.

``model.json`` (format ``medssl-bundle``, version 1) holds::

    {"format": "medssl-bundle", "format_version": 1,
     "architecture": {"name": "unet3d", "width": 32, "in_channels": 1, "out_channels": 1},
     "method": {"name": "genesis", ...settings},
     "task": "pretrain" | "segment" | "classify" | ...,
     "classes": {"1": {"name": "spleen", "color": [r, g, b]}, ...}     (segment/classify only)
     "preprocessing": {"modality": "CT", "intensity": {...}, "target_spacing_mm": null},
     "patch_size": [64, 64, 32],
     "history": [{"step": ..., "loss": ..., "val_loss": ...}, ...],
     "data_summary": {"volumes": N, "shapes": [...], "spacings_mm": [...]},   (no paths, no identifiers)
     "versions": {"medssl": ..., "torch": ..., "monai": ...}, "world_size": 1}

and, by task, ``init``, ``training``, ``channels``, ``class_values``, ``detection``, ``inference``,
``transfer``, ``batchnorm``, ``head``, ``input_fit`` and ``fewshot``. :class:`BundleMeta` is that content
typed: every writer builds one and every reader gets one (:func:`read_bundle_meta`), so the keys, their
types and the defaults for keys older bundles lack are written down once; keys it does not know (a
method's own fields) round-trip in ``extra``. A bundle of another format or a newer format version is
refused in one line naming its model.json.

Loading reads JSON and safetensors only: nothing is unpickled. Official Models Genesis ``.pt`` files load
through :func:`load_initial_weights` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from MedSSL import __version__
from MedSSL.errors import MedSSLError

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
BUNDLE_FORMAT = "medssl-bundle"
BUNDLE_VERSION = 1


class _Absent:
    """The value of a field whose key is not in model.json (a JSON null is kept as None)."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT = _Absent()
_NULL = type(None)


def _key(*types, items=None, default=ABSENT):
    """A model.json key: the JSON types it may hold (``type(None)`` for null), ``items`` the type of a list's
    elements; absent by default (not written, see :data:`ABSENT`)."""
    return field(default=default, metadata={"json": types, "items": items})


class _Invalid(Exception):
    """A model.json value of the wrong type; the message names the key."""


def _check(name: str, value, types, items):
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and items is not None and isinstance(value, list):
        ok = all(isinstance(v, items) and not isinstance(v, bool) for v in value)
    if not ok:
        want = " or ".join({dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
                            bool: "true/false", _NULL: "null"}[t] for t in types)
        raise _Invalid(f"{name} is {json.dumps(value)[:40]}, expected {want}"
                       + (f" of {items.__name__}s" if items else ""))
    return value


class _Record:
    """Parsing and writing of a JSON object with typed keys; keys no field names round-trip in ``extra``."""

    @classmethod
    def _parse(cls, data, where: str):
        if not isinstance(data, dict):
            raise _Invalid(f"{where} is {json.dumps(data)[:40]}, expected an object")
        names = [f.name for f in fields(cls) if f.name != "extra"]
        values = {}
        for f in fields(cls):
            if f.name in data and f.name != "extra":
                sub = f.metadata.get("record")
                value = data[f.name]
                name = f"{where}.{f.name}" if where else f.name
                values[f.name] = sub._parse(value, name) if sub else _check(name, value, f.metadata["json"], f.metadata["items"])
        return cls(**values, extra={k: v for k, v in data.items() if k not in names})

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not ABSENT:
                out[f.name] = value.to_json() if isinstance(value, _Record) else value
        return {**out, **self.extra}


@dataclass(frozen=True)
class Architecture(_Record):
    """model.json ``architecture``: ``unet3d`` (width, in/out channels, spatial_dims) or the few-shot
    ``fewshot-appearance`` (features, hidden, out_channels, feature_scales_mm, backbone_width)."""

    name: str = field(metadata={"json": (str,), "items": None})
    width: int = _key(int)  # unet3d: width, in/out channels, spatial_dims
    in_channels: int = _key(int)
    out_channels: int = _key(int)  # few-shot too: classes + 1
    spatial_dims: int = _key(int)
    backbone_width: int | None = _key(int, _NULL)  # few-shot: the U-Net whose features it uses, and its own
    features: int = _key(int)
    hidden: int = _key(int)
    feature_scales_mm: list = _key(list)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BundleMeta(_Record):
    """model.json, typed. Fields hold :data:`ABSENT` for keys a bundle does not have (a writer leaves them
    out, or an older bundle lacks them); the properties below give a reader's defaults for those, in one
    place. ``to_json()`` is the file's content (``format`` fields first, then the keys present, then ``extra``,
    ``versions`` last); :meth:`from_json` checks the format name, version and every key's type."""

    architecture: Architecture = field(metadata={"record": Architecture})
    task: str = _key(str)
    method: dict = _key(dict)  # {"name": ..., settings}: the SSL method's describe() and bundle_meta() fields
    init: dict = _key(dict)
    preprocessing: dict = _key(dict)  # {"intensity": {...}, "target_spacing_mm": [..] | null, "modality": ..}
    patch_size: list = _key(list, items=int)
    training: dict = _key(dict)
    history: list = _key(list, items=dict)
    world_size: int = _key(int)
    classes: dict = _key(dict)  # {"1": {"name": ..., "color": [r, g, b]}}
    channels: list = _key(list, items=int)  # segment: channel -> label value
    class_values: list = _key(list, items=int)  # classify: output -> label value
    detection: bool = _key(bool)
    inference: dict = _key(dict)  # {"overlap": .., "blend": .., "window": "plane"}
    transfer: str | None = _key(str, _NULL)
    batchnorm: str = _key(str)
    head: str = _key(str)
    input_fit: str = _key(str)
    fewshot: dict = _key(dict)
    data_summary: dict = _key(dict)
    cohort: dict = _key(dict)  # cohort model: {"width", "working_spacing_mm", "completion": {...}} (choices made)
    versions: dict = _key(dict)
    format_version: int = BUNDLE_VERSION
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data, path) -> "BundleMeta":
        """Parse model.json content; MedSSLError in one line naming ``path`` for another format, a newer
        format version, a missing architecture or a value of the wrong type."""
        if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
            raise MedSSLError(f"{path}: not a MedSSL model.json (format field missing or wrong)")
        version = data.get("format_version", 0)  # 0: written before the field existed
        if not isinstance(version, int) or isinstance(version, bool):
            raise MedSSLError(f"{path}: model.json has an unreadable format_version {json.dumps(version)[:20]}")
        if version > BUNDLE_VERSION:
            raise MedSSLError(f"{path}: bundle format version {version} is newer than this MedSSL reads "
                              f"({BUNDLE_VERSION}); update MedSSL")
        if not isinstance(data.get("architecture"), dict) or "name" not in data["architecture"]:
            raise MedSSLError(f"{path}: model.json has no architecture")
        body = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        try:
            meta = cls._parse(body, "")
        except _Invalid as exc:
            raise MedSSLError(f"{path}: {exc}") from None
        return replace(meta, format_version=version)

    def to_json(self) -> dict:
        body = super().to_json()
        del body["format_version"]
        versions = body.pop("versions", ABSENT)
        head = {"format": BUNDLE_FORMAT, **({"format_version": self.format_version} if self.format_version else {})}
        return {**head, **body, **({} if versions is ABSENT else {"versions": versions})}

    def merged(self, changes: dict, what: str) -> "BundleMeta":
        """These fields with ``changes`` (model.json keys) replacing theirs, an ``architecture`` dict merged key by
        key; checked as :meth:`from_json`, errors naming ``what``."""
        data = self.to_json()
        architecture = {**data["architecture"], **changes.get("architecture", {})}
        return BundleMeta.from_json({**data, **changes, "architecture": architecture}, what)

    # reading defaults for keys a bundle may lack
    @property
    def spatial_dims(self) -> int:
        return 3 if self.architecture.spatial_dims is ABSENT else self.architecture.spatial_dims

    @property
    def in_channels(self) -> int:
        return 1 if self.architecture.in_channels is ABSENT else self.architecture.in_channels

    @property
    def class_table(self) -> dict[int, dict]:
        """{label value: {"name", "color"}} (none when the bundle has no classes)."""
        return {int(k): (v if isinstance(v, dict) else {"name": str(v)}) for k, v in (self.classes or {}).items()}

    @property
    def patch(self) -> tuple:
        """The training patch (X, Y, Z); 64 x 64 x 32 (2D: 64 x 64 x 1) when not recorded."""
        patch = tuple(self.patch_size) if self.patch_size else (64, 64, 32)
        return (*patch[:2], 1) if self.spatial_dims == 2 else patch

    @property
    def channel_values(self) -> list[int]:
        """segment: channel -> label value; background and the classes in order when not recorded."""
        return list(self.channels) if self.channels else [0, *sorted(self.class_table)]

    @property
    def output_values(self) -> list[int]:
        """classify: output -> label value; the classes in order when not recorded."""
        return list(self.class_values) if self.class_values else sorted(self.class_table)

    def inference_setting(self, name: str):
        """``inference.<name>`` (overlap, blend, window), None when not recorded."""
        return (self.inference or {}).get(name)

    def preprocessing_setting(self, name: str):
        """``preprocessing.<name>`` (intensity, target_spacing_mm, modality), None when not recorded."""
        return (self.preprocessing or {}).get(name)

    @property
    def method_name(self) -> str | None:
        return (self.method or {}).get("name")


def versions() -> dict:
    """Versions of the libraries that shape a bundle's contents."""
    out = {"medssl": __version__, "torch": torch.__version__}
    try:  # from the installed package's metadata: importing MONAI itself takes seconds
        out["monai"] = importlib.metadata.version("monai")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - monai is a dependency
        pass
    return out


def save_bundle(out_dir, state_dict: dict, meta: BundleMeta | dict) -> Path:
    """Write a bundle directory atomically: both files are staged in a temporary sibling folder
    which then replaces ``out_dir`` (an existing bundle there is replaced whole, other files in
    ``out_dir`` such as checkpoints are kept).

    state_dict: name -> tensor (contiguous copies are saved). meta: the model.json content (``versions``
    is filled in when absent); a dict (tests and benchmarks write literal content without the format
    fields) is parsed into a :class:`BundleMeta` first. What is written is checked to load.
    """
    out_dir = Path(out_dir)
    if isinstance(meta, dict):
        meta = BundleMeta.from_json({"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, **meta}, out_dir / META_FILE)
    if meta.versions is ABSENT:
        meta = replace(meta, versions=versions())
    text = json.dumps(meta.to_json(), indent=2, sort_keys=False)
    BundleMeta.from_json(json.loads(text), out_dir / META_FILE)  # e.g. a tuple where a list of ints belongs is fine
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSSLError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise MedSSLError(f"{out_dir}: the output folder is not writable")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_dir))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
        (staging / META_FILE).write_text(text, encoding="utf-8")
        # weights first, model.json last: a bundle is complete once model.json names it
        os.replace(staging / WEIGHTS_FILE, out_dir / WEIGHTS_FILE)
        os.replace(staging / META_FILE, out_dir / META_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def read_bundle_meta(bundle_dir) -> BundleMeta:
    """model.json of a bundle, parsed and checked (:meth:`BundleMeta.from_json`). Raises MedSSLError naming the folder or file."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise MedSSLError(f"{bundle_dir}: not a model bundle folder")
    meta_path = bundle_dir / META_FILE
    if not meta_path.is_file():
        raise MedSSLError(f"{bundle_dir}: not a model bundle (no {META_FILE})")
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise MedSSLError(f"{meta_path}: broken model.json ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    return BundleMeta.from_json(data, meta_path)


def read_meta(bundle_dir) -> dict:
    """model.json of a bundle as a dict, checked as :func:`read_bundle_meta` (for callers indexing the JSON)."""
    return read_bundle_meta(bundle_dir).to_json()


def load_weights(bundle_dir) -> dict:
    """The state dict of a bundle (safetensors only: nothing is unpickled)."""
    weights = Path(bundle_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise MedSSLError(f"{bundle_dir}: bundle has no {WEIGHTS_FILE}")
    try:
        return load_file(str(weights))
    except Exception as exc:  # SafetensorError, OSError, ValueError, or anything else a damaged file causes
        raise MedSSLError(f"{weights}: unreadable weights ({type(exc).__name__}: {str(exc)[:100]})") from None


def load_bundle(bundle_dir) -> tuple[dict, dict]:
    """(model.json as a dict, state_dict) of a bundle. Only JSON and safetensors are read."""
    return read_meta(bundle_dir), load_weights(bundle_dir)


def open_bundle(bundle_dir) -> tuple[BundleMeta, dict]:
    """(meta, state_dict) of a bundle. Only JSON and safetensors are read."""
    return read_bundle_meta(bundle_dir), load_weights(bundle_dir)


def is_bundle(path) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()
