"""Labelled datasets for methods that accrue knowledge from several annotated collections (Ark).

``medssl pretrain --datasets SPEC.json`` takes a spec::

    {"datasets": [
        {"name": "liver-set", "classes": {"1": "liver"},
         "cases": [{"image": "ct/001.nii.gz", "label": "seg/001.nii.gz"}, ...]},
        {"name": "spleen-set", "classes": {"1": {"name": "spleen", "color": [0.6, 0.4, 0.6]}}, "cases": [...]}]}

Relative paths resolve against the spec's folder. Each dataset has its own label values (0 background,
255 not annotated, the listed classes); datasets need not agree on values or on what they annotate.

:func:`read_spec` checks the structure (keys, names, classes, files present) without reading any image;
:func:`load_datasets` then reads every (image, label) pair once, checks it (label on its image's grid,
only listed values, every listed class annotated somewhere in its dataset), normalises the image with
:mod:`MedSSL.data.preprocess` (optionally resampled) and caches both arrays as ``.npy`` files keyed by the
files' bytes and the settings, so later runs (and resumed ones) memory-map them without reading the
images again. Every error is one line naming the spec and the entry.

2D: with ``spatial_dims=2`` every case must be a one-slice image (X, Y, 1) with a one-slice label map
(radiographs: Ark in 2D); with 3 (the default) every case must be a 3D volume. :func:`case_dimensions`
tells which from the files' headers, before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from MedSSL.data.labelled_cases import check_dimensions, load_cached_case, make_cached_case, pair_key
from MedSSL.data.labels import classes_from_json, default_color
from MedSSL.data.preprocess import IntensityConfig
from MedSSL.data.spatial import is_one_slice_file
from MedSSL.errors import MedSSLError
from MedSSL.io.output import read_json

SPEC_KEYS = {"datasets"}
DATASET_KEYS = {"name", "classes", "cases"}
CASE_KEYS = {"image", "label"}


@dataclass
class LabelledDataset:
    """A dataset of the spec: its name, its classes {value: {"name", "color"}} and its cases (training
    and held-out validation)."""

    name: str
    classes: dict
    cases: list = field(default_factory=list)
    val_cases: list = field(default_factory=list)

    @property
    def values(self) -> list[int]:
        return sorted(self.classes)


def _entry(spec: Path, i: int, name=None, j: int | None = None) -> str:
    where = f"{spec}: datasets[{i}]" + (f" ({name})" if name else "")
    return where + (f" case {j}" if j is not None else "")


def _unknown_keys(obj: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise MedSSLError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (expected {', '.join(sorted(allowed))})")


def read_spec(path) -> dict:
    """Parse and check ``SPEC.json`` (structure and file existence only).

    Returns ``{"spec": Path, "datasets": [{"name", "classes": {value: {"name", "color"}},
    "cases": [{"image": Path, "label": Path}]}]}``. Raises one-line MedSSLErrors naming the spec and entry.
    """
    spec = Path(path)
    if not spec.is_file():
        raise MedSSLError(f"--datasets {spec}: no such file")
    data = read_json(spec)
    if not isinstance(data, dict):
        raise MedSSLError(f'{spec}: expected a JSON object {{"datasets": [...]}}')
    _unknown_keys(data, SPEC_KEYS, str(spec))
    entries = data.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise MedSSLError(f'{spec}: "datasets" must be a non-empty list of datasets')
    base = spec.resolve().parent
    out, names = [], {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise MedSSLError(f"{_entry(spec, i)}: expected an object with name, classes and cases")
        _unknown_keys(entry, DATASET_KEYS, _entry(spec, i))
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise MedSSLError(f"{_entry(spec, i)}: needs a non-empty \"name\"")
        name = name.strip()
        if name.casefold() in names:
            raise MedSSLError(f"{_entry(spec, i, name)}: the same name as datasets[{names[name.casefold()]}]")
        names[name.casefold()] = i
        if "classes" not in entry:
            raise MedSSLError(f"{_entry(spec, i, name)}: needs \"classes\", e.g. {{\"1\": \"liver\"}}")
        classes = classes_from_json(entry["classes"], f"{_entry(spec, i, name)}: classes")
        for key, raw in entry["classes"].items():  # colours the spec gives explicitly
            if isinstance(raw, dict) and "color" in raw:
                classes[int(str(key).strip())]["color_given"] = True
        cases = entry.get("cases")
        if not isinstance(cases, list) or not cases:
            raise MedSSLError(f"{_entry(spec, i, name)}: \"cases\" must be a non-empty list of {{\"image\", \"label\"}}")
        pairs = []
        for j, case in enumerate(cases):
            where = _entry(spec, i, name, j)
            if not isinstance(case, dict):
                raise MedSSLError(f"{where}: expected an object {{\"image\": PATH, \"label\": PATH}}")
            _unknown_keys(case, CASE_KEYS, where)
            pair = {}
            for key in ("image", "label"):
                value = case.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise MedSSLError(f"{where}: needs \"{key}\": a path")
                p = Path(value).expanduser()
                p = p if p.is_absolute() else base / p
                if not p.exists():
                    raise MedSSLError(f"{where}: {key} {value}: no such file or folder")
                pair[key] = p
            pairs.append(pair)
        out.append({"name": name, "classes": classes, "cases": pairs})
    return {"spec": spec, "datasets": out}


def union_classes(datasets: list) -> tuple[dict, list[dict]]:
    """The union of the datasets' classes by name (case-insensitive), numbered 1, 2, ... in spec order.

    ``datasets``: dicts with "classes" or :class:`LabelledDataset`. Returns ({global value: {"name",
    "color"}}, [per dataset {own value: global value}]). A class takes the colour the spec gives it
    (the first dataset that gives one), else the palette colour of its global value.
    """
    union: dict[int, dict] = {}
    by_name: dict[str, int] = {}
    mappings = []
    for dataset in datasets:
        classes = dataset["classes"] if isinstance(dataset, dict) else dataset.classes
        mapping = {}
        for value in sorted(classes):
            entry = classes[value]
            key = entry["name"].casefold()
            if key not in by_name:
                g = len(union) + 1
                by_name[key] = g
                union[g] = {"name": entry["name"], "color": default_color(g), "given": False}
            g = by_name[key]
            if entry.get("color_given", False) and not union[g]["given"]:
                union[g].update(color=[float(c) for c in entry["color"]], given=True)
            mapping[value] = g
        mappings.append(mapping)
    return {g: {"name": e["name"], "color": e["color"]} for g, e in union.items()}, mappings


def case_dimensions(spec: dict) -> tuple[int, str | None]:
    """From the headers of a :func:`read_spec` result: (2 when every case's image is a one-slice image,
    else 3; ``None``, or a one-line description of a mix of one-slice and 3D cases naming the spec and
    the first case of each kind)."""
    flat, deep = [], []
    for i, entry in enumerate(spec["datasets"]):
        for j, pair in enumerate(entry["cases"]):
            (flat if is_one_slice_file(pair["image"]) else deep).append((i, entry["name"], j, pair["image"]))
    if flat and deep:
        (fi, fname, fj, fimage), (di, dname, dj, dimage) = flat[0], deep[0]
        return 3, (f"{spec['spec']}: mixes {len(flat)} one-slice (2D) case(s) with {len(deep)} 3D case(s) "
                   f"(e.g. datasets[{fi}] ({fname}) case {fj}: {fimage.name} is one slice, datasets[{di}] ({dname}) "
                   f"case {dj}: {dimage.name} is 3D); pretrain on them separately")
    return (2 if flat else 3), None


def load_datasets(spec: dict, intensity: IntensityConfig, spacing, cache_dir,
                  progress: Callable[[int, int, bool], None] | None = None,
                  val_fraction: float = 0.0, seed: int = 0, spatial_dims: int = 3) -> list[LabelledDataset]:
    """Read, check, preprocess and cache every case of a :func:`read_spec` result.

    Checks per case: the label lies on its image's grid, holds integers 0..255 and only the values of
    its dataset's classes (plus 0 and 255), the image is 3D (``spatial_dims`` 3) or one slice (2, where
    ``spacing`` resamples the plane only); per dataset: every listed class is annotated in some case.
    With ``val_fraction`` > 0 a dataset keeps ``round(val_fraction * cases)`` cases (when >= 1, and at
    least one for training) for validation, chosen with ``seed``.
    """
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSSLError(f"{cache_dir}: cannot create the cache folder ({exc.strerror})") from None
    path = spec["spec"]
    total = sum(len(d["cases"]) for d in spec["datasets"])
    done = 0
    out = []
    for i, entry in enumerate(spec["datasets"]):
        name, classes = entry["name"], entry["classes"]
        cases, found = [], set()
        for j, pair in enumerate(entry["cases"]):
            where = _entry(path, i, name, j)
            try:
                key = pair_key(pair["image"], pair["label"], intensity, spacing)
            except OSError as exc:
                raise MedSSLError(f"{where}: cannot read ({exc.strerror})") from None
            case = load_cached_case(cache_dir, key)
            cached = case is not None
            if case is None:
                case = make_cached_case(pair, key, where, intensity, spacing, spatial_dims, cache_dir)
            else:  # the same files may have been cached by a run of the other dimensionality
                check_dimensions(case.image.shape, spatial_dims, where, pair["image"])
            unlisted = [v for v in case.info["values"] if v not in classes]
            if unlisted:
                raise MedSSLError(
                    f"{where}: label {pair['label']} holds value(s) {', '.join(map(str, unlisted))} not listed in the "
                    "dataset's classes (list them, or set them to 0 = background or 255 = not annotated)")
            found.update(case.info["values"])
            cases.append(case)
            done += 1
            if progress is not None:
                progress(done, total, cached)
        absent = [v for v in sorted(classes) if v not in found]
        if absent:
            names = ", ".join(f"{v} ({classes[v]['name']})" for v in absent)
            raise MedSSLError(f"{_entry(path, i, name)}: class(es) {names} annotated in none of its labels")
        out.append(_with_validation_cases(LabelledDataset(name, dict(classes), cases), val_fraction, [seed, i]))
    return out


def _with_validation_cases(dataset: LabelledDataset, val_fraction: float, seed) -> LabelledDataset:
    """``dataset`` with ``round(val_fraction * cases)`` of its cases (when >= 1, and at least one left for
    training) moved to ``val_cases``, chosen with a generator seeded by ``seed``."""
    cases = dataset.cases
    n_val = int(round(val_fraction * len(cases))) if val_fraction > 0 else 0
    if n_val >= 1 and len(cases) >= 2:
        n_val = min(n_val, len(cases) - 1)
        order = np.random.default_rng(seed).permutation(len(cases))
        held = set(order[:n_val].tolist())
        dataset.cases = [c for k, c in enumerate(cases) if k not in held]
        dataset.val_cases = [c for k, c in enumerate(cases) if k in held]
    return dataset


def summary(datasets: list[LabelledDataset]) -> dict:
    """What a bundle records about the data: counts, shapes, spacings, modalities (no paths)."""
    rows = []
    modalities: dict[str, int] = {}
    for d in datasets:
        every = d.cases + d.val_cases
        for c in every:
            modalities[c.info["modality"]] = modalities.get(c.info["modality"], 0) + 1
        rows.append({"name": d.name, "cases": len(every), "validation_cases": len(d.val_cases),
                     "classes": {str(v): e["name"] for v, e in sorted(d.classes.items())},
                     "shapes": [c.info["shape"] for c in every], "spacings_mm": [c.info["spacing_mm"] for c in every]})
    return {"volumes": sum(r["cases"] for r in rows), "datasets": rows, "modalities": modalities}
