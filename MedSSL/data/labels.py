"""Label maps and classes for fine-tuning.

A label map is an integer volume on its image's grid: 0 = background, 1..254 = a class (values need not
be contiguous: TotalSegmentator ids go up to 117), 255 = not annotated (ignored by the loss). A user who
painted three slices passes a label that is 255 everywhere else.

Internally the values are mapped to contiguous channels (0 = background, 1..n = the class values in
increasing order, :data:`IGNORE` kept as is); the bundle's ``classes`` maps the original values to names
and colours so predictions write the original values back.

Class names and colours come from, in order of precedence:

1. ``--classes``: a JSON file ``{"1": {"name": "spleen", "color": [r, g, b]}, ...}`` (colours 0..1; a
   plain ``{"1": "spleen"}`` also works) or a comma list ``1=spleen,2=liver``;
2. a sidecar file next to the (first) label: the label's file name with its volume suffix replaced by
   ``.classes.json`` (``label.nii.gz`` -> ``label.classes.json``, ``seg.nrrd`` -> ``seg.classes.json``),
   in the same JSON format;
3. otherwise ``label_<value>`` and a colour from a fixed palette.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MedSSL.data.spatial import is_one_slice
from MedSSL.errors import MedSSLError
from MedSSL.io.output import read_json
from MedSSL.io.volumes import VOLUME_SUFFIXES, Volume

IGNORE = 255
MAX_CLASS_VALUE = 254

_PALETTE = [
    (0.90, 0.35, 0.30), (0.35, 0.70, 0.35), (0.30, 0.50, 0.90), (0.95, 0.80, 0.25), (0.65, 0.40, 0.80),
    (0.30, 0.80, 0.80), (0.95, 0.55, 0.20), (0.60, 0.80, 0.30), (0.85, 0.45, 0.65), (0.55, 0.55, 0.55),
]


def default_color(value: int) -> list[float]:
    """A stable display colour (r, g, b in 0..1) for class ``value``."""
    if 1 <= value <= len(_PALETTE):
        return [round(c, 4) for c in _PALETTE[value - 1]]
    hue = (value * 0.618033988749895) % 1.0
    return [round(c, 4) for c in colorsys.hsv_to_rgb(hue, 0.6, 0.9)]


def default_name(value: int) -> str:
    return f"label_{value}"


def sidecar_path(label_path) -> Path:
    """``<label>.classes.json`` next to ``label_path`` (its volume suffix replaced)."""
    p = Path(label_path)
    name = p.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return p.with_name(name + ".classes.json")


def _class_value(key, where: str, allow_zero: bool = False) -> int:
    try:
        value = int(str(key).strip())
    except ValueError:
        raise MedSSLError(f"{where}: class key {key!r} is not an integer label value") from None
    if allow_zero and value == 0:
        return value
    if not 1 <= value <= MAX_CLASS_VALUE:
        raise MedSSLError(f"{where}: class value {value} out of range (1..{MAX_CLASS_VALUE}; 0 is background, 255 not annotated)")
    return value


def _class_entry(value: int, entry, where: str) -> dict:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise MedSSLError(f"{where}: class {value}: expected a name or {{\"name\": ..., \"color\": [r, g, b]}}")
    name = str(entry.get("name") or default_name(value)).strip()
    color = entry.get("color", default_color(value))
    try:
        color = [float(c) for c in color]
    except (TypeError, ValueError):
        raise MedSSLError(f"{where}: class {value} ({name}): color must be three numbers in 0..1") from None
    if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
        raise MedSSLError(f"{where}: class {value} ({name}): color must be three numbers in 0..1, got {color}")
    return {"name": name, "color": [round(c, 4) for c in color]}


def classes_from_json(data, where: str, allow_zero: bool = False) -> dict[int, dict]:
    """``{"1": {"name", "color"}} | {"1": "name"}`` -> {1: {"name": str, "color": [r, g, b]}}.

    allow_zero: 0 is a valid class value (volume-level classes); for label maps 0 is background.
    """
    if not isinstance(data, dict) or not data:
        raise MedSSLError(f"{where}: expected a JSON object mapping label values to class names")
    classes = {}
    for key, entry in data.items():
        value = _class_value(key, where, allow_zero)
        classes[value] = _class_entry(value, entry, where)
    _check_unique_names(classes, where)
    return classes


def _check_unique_names(classes: dict[int, dict], where: str) -> None:
    seen: dict[str, int] = {}
    for value, entry in sorted(classes.items()):
        if entry["name"] in seen:
            raise MedSSLError(f"{where}: classes {seen[entry['name']]} and {value} have the same name {entry['name']!r}")
        seen[entry["name"]] = value


def read_classes_file(path, allow_zero: bool = False) -> dict[int, dict]:
    return classes_from_json(read_json(path), str(path), allow_zero)


def parse_classes(spec: str | None, allow_zero: bool = False) -> dict[int, dict] | None:
    """``--classes``: a JSON file path or a comma list ``1=spleen,2=liver``; None when not given."""
    if spec is None:
        return None
    spec = spec.strip()
    if Path(spec).is_file() or spec.lower().endswith(".json"):
        if not Path(spec).is_file():
            raise MedSSLError(f"--classes {spec}: no such file")
        return read_classes_file(spec, allow_zero)
    data = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise MedSSLError(f"--classes {spec}: expected VALUE=NAME items separated by commas (e.g. 1=spleen,2=liver) or a JSON file")
        key, name = item.split("=", 1)
        if not name.strip():
            raise MedSSLError(f"--classes {spec}: class {key.strip()} has an empty name")
        data[key.strip()] = name.strip()
    return classes_from_json(data, f"--classes {spec}", allow_zero)


def label_array(label: Volume, image: Volume, label_path, image_path) -> np.ndarray:
    """Check ``label`` against ``image`` and return its values as uint8 (X, Y, Z) (Z = 1 for a
    one-slice image).

    Raises MedSSLError naming ``label_path`` when it is not on the image's grid, holds non-integer,
    negative or >= 255 values (255 itself means "not annotated"), or has nothing annotated.
    """
    if not label.same_grid(image):
        raise MedSSLError(
            f"{label_path}: not on the grid of {image_path} (label {list(label.shape)} at "
            f"{np.round(label.spacing, 3).tolist()} mm, image {list(image.shape)} at {np.round(image.spacing, 3).tolist()} mm; "
            "origin and direction must match too): resample the label onto the image first"
        )
    a = label.array
    if a.dtype.kind == "f":
        if not np.all(np.abs(a - np.rint(a)) < 1e-3):
            raise MedSSLError(f"{label_path}: holds non-integer values; a label map must hold integer class values")
        a = np.rint(a)
    elif a.dtype.kind not in "iub":
        raise MedSSLError(f"{label_path}: unsupported voxel type {a.dtype} for a label map")
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo < 0:
        raise MedSSLError(f"{label_path}: holds negative values (down to {lo}); use 0 for background and 255 for not annotated")
    if hi > IGNORE:
        raise MedSSLError(f"{label_path}: holds values up to {hi}; class values must be 1..{MAX_CLASS_VALUE} (255 = not annotated)")
    out = a.astype(np.uint8)
    if not np.any(out != IGNORE):
        raise MedSSLError(f"{label_path}: nothing is annotated (every voxel is 255 = not annotated)")
    return out


def present_values(array: np.ndarray) -> list[int]:
    """Class values (1..254) present in a uint8 label array."""
    counts = np.bincount(array.reshape(-1), minlength=256)
    return [int(v) for v in np.flatnonzero(counts[1:IGNORE]) + 1]


@dataclass
class LabelMapping:
    """Original label values <-> contiguous channels. ``values[c - 1]`` is the value of channel c."""

    values: list[int]

    @property
    def n_channels(self) -> int:
        """Output channels of the network: background + one per class."""
        return len(self.values) + 1

    def lut(self) -> np.ndarray:
        """(256,) uint8 lookup table: value -> channel (0 background, 255 stays 255 = ignored)."""
        table = np.full(256, IGNORE, dtype=np.uint8)
        table[0] = 0
        for channel, value in enumerate(self.values, start=1):
            table[value] = channel
        return table

    def to_channels(self, labels: np.ndarray) -> np.ndarray:
        """uint8 label values (X, Y, Z) -> uint8 channels, 255 where not annotated."""
        return self.lut()[labels]

    def channel_values(self) -> np.ndarray:
        """(n_channels,) uint8: channel -> original value (0 for background)."""
        return np.array([0, *self.values], dtype=np.uint8)


def resolve_classes(values: list[int], given: dict[int, dict] | None, where: str) -> dict[int, dict]:
    """Names and colours for the class ``values`` found in the labels.

    With ``given`` (from ``--classes`` or a sidecar, named by ``where``) every found value must be listed
    and every listed class must be annotated somewhere; otherwise default names and colours are used.
    """
    if given is None:
        return {v: {"name": default_name(v), "color": default_color(v)} for v in values}
    unknown = [v for v in values if v not in given]
    if unknown:
        raise MedSSLError(f"{where}: label value(s) {', '.join(map(str, unknown))} found in the labels are not listed")
    absent = [v for v in given if v not in values]
    if absent:
        names = ", ".join(f"{v} ({given[v]['name']})" for v in sorted(absent))
        raise MedSSLError(f"{where}: class(es) {names} have no annotated voxels in any label")
    return {v: given[v] for v in sorted(given)}


def classes_to_json(classes: dict[int, dict]) -> dict:
    """{value: entry} -> the bundle's ``{"value": {"name", "color"}}``."""
    return {str(v): {"name": e["name"], "color": list(e["color"])} for v, e in sorted(classes.items())}


def _longest_run(flags: np.ndarray) -> int:
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def annotation_summary(labels: np.ndarray) -> dict:
    """How a label map was annotated (counts only, no positions).

    ``kind``: "slices" when, along the axis with the smallest fraction of annotated slices, at most
    half of the slices hold annotated voxels and they come as isolated slices (runs of at most 2
    neighbours: painted slices, not slabs); ``axis`` = that array axis, ``slices`` = how many. Else
    "dense". ``fraction``: annotated voxels / all voxels. A one-slice label map (X, Y, 1) is always
    "dense": the rows of a 2D image are not painted slices (strokes on a radiograph are partial
    annotation, which ``fraction`` tells).
    """
    annotated = labels != IGNORE
    total = annotated.size
    if is_one_slice(labels.shape):
        return {"kind": "dense", "fraction": round(float(np.count_nonzero(annotated)) / max(1, total), 5)}
    per_axis = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        per_axis.append(annotated.any(axis=other))
    axis = int(np.argmin([flags.mean() for flags in per_axis]))
    flags = per_axis[axis]
    fraction = float(np.count_nonzero(annotated)) / max(1, total)
    if flags.sum() <= labels.shape[axis] / 2 and _longest_run(flags) <= 2 and fraction < 0.5:
        return {"kind": "slices", "axis": axis, "slices": int(flags.sum()), "fraction": round(fraction, 5)}
    return {"kind": "dense", "fraction": round(fraction, 5)}
