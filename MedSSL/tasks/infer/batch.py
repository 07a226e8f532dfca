"""``medssl predict`` on many scans in one call: the model loaded once, one label map per scan, a summary.

``--image`` takes several files, folders (searched recursively, :func:`MedSSL.io.volumes.find_volumes`) or
DICOM series folders; ``--out`` is then a folder. Each scan's label map is ``<out>/<name>.nii.gz`` (``name``
from the file or series folder, made unique), written as soon as it is done; ``<out>/summary.csv`` and
``summary.json`` list per scan the output, the voxels and volume (mL) of each class and the seconds taken.
A scan that cannot be read or segmented is reported in the summary with its one-line reason and the others
go on; the command then ends with an error naming how many failed.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from MedSSL.errors import MedSSLError
from MedSSL.io.atomic import atomic_write_text
from MedSSL.io.volumes import VOLUME_SUFFIXES, WRITE_SUFFIXES, find_volumes, read_volume, write_volume
from MedSSL.engine.progress import Progress
from MedSSL.tasks.infer import PredictOptions
from MedSSL.tasks.infer.model import LoadedModel
from MedSSL.tasks.infer.predict import segment


def is_batch(images: list) -> bool:
    """Several sources, or one folder that is not itself a DICOM series."""
    if len(images) != 1:
        return True
    p = Path(images[0])
    if not p.is_dir():
        return False
    from MedSSL.io.dicom import dicom_series

    return not dicom_series(p)


def output_name(source: Path, taken: set) -> str:
    """``source``'s name without its volume suffix (a DICOM folder: its name), unique within ``taken``."""
    name = source.name
    for suffix in VOLUME_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = name or "scan"
    unique, i = name, 2
    while unique.casefold() in taken:
        unique, i = f"{name}_{i}", i + 1
    taken.add(unique.casefold())
    return unique


def check_batch_out(out) -> Path:
    """``--out`` of a batch: a folder (created when missing), not a volume file name."""
    p = Path(out)
    if p.name.lower().endswith(WRITE_SUFFIXES + (".json",)):
        raise MedSSLError(f"--out {out}: with several images, --out is a folder (one label map per scan is written there)")
    if p.exists() and not p.is_dir():
        raise MedSSLError(f"--out {out}: is a file; with several images give a folder")
    return p


def predict_many(model: LoadedModel, images: list, out, options: PredictOptions, progress: Progress) -> dict:
    """Segment every scan of ``images`` (paths, folders) into ``out``; returns ``{"summary": path, "scans": n,
    "failed": n, "outputs": [paths]}``. Raises MedSSLError after writing the summary when a scan failed."""
    if model.task != "segment":
        raise MedSSLError("--model: a classification bundle; several images are predicted one by one "
                          "(a batch writes label maps)")
    sources = find_volumes(images)  # first: an input that holds no scan is named before --out is looked at
    folder = check_batch_out(out)
    rows, taken, outputs = [], set(), []
    for i, source in enumerate(sources, start=1):
        name = output_name(Path(source), taken)
        progress.stage("predict", f"scan {i} of {len(sources)}: {name}")
        rows.append(_one(model, Path(source), folder / f"{name}.nii.gz", options))
        if "labels" in rows[-1]:
            outputs.append(rows[-1]["labels"])
        progress.update(i, len(sources))
        progress.log(f"scan {i} of {len(sources)}: {name}: " +
                     (rows[-1]["error"] if "error" in rows[-1] else f"{rows[-1]['seconds']:.1f} s"))
    summary = write_summary(folder, rows, model)
    failed = sum(1 for r in rows if "error" in r)
    if failed:
        raise MedSSLError(f"--image: {failed} of {len(rows)} scan(s) failed (reasons in {summary})")
    return {"summary": str(summary), "scans": len(rows), "failed": failed, "outputs": outputs}


def _one(model: LoadedModel, source: Path, target: Path, options: PredictOptions) -> dict:
    started = time.perf_counter()
    row: dict = {"image": source.name, "labels": target.name}
    try:
        volume = read_volume(source)
        result = segment(model, volume, source, options)
        write_volume(result.labels, target)
    except MedSSLError as exc:
        row.pop("labels")
        row["error"] = str(exc)
        return row
    row["labels"] = str(target)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    counts = np.bincount(result.labels.array.reshape(-1), minlength=256)
    for value in model.classes:
        row[f"{model.name_of(value)} voxels"] = int(counts[int(value)])
        row[f"{model.name_of(value)} mL"] = round(int(counts[int(value)]) * voxel_ml, 3)
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def write_summary(folder: Path, rows: list[dict], model: LoadedModel) -> Path:
    """``summary.csv`` (one row per scan) and ``summary.json`` in ``folder``; returns the CSV's path."""
    columns = ["image", "labels"] + [f"{model.name_of(v)} {unit}" for v in model.classes for unit in ("voxels", "mL")] + \
        ["seconds", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "labels": Path(row["labels"]).name if "labels" in row else ""})
    path = folder / "summary.csv"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text.getvalue())
        atomic_write_text(folder / "summary.json", json.dumps(rows, indent=2) + "\n")
    except OSError as exc:
        raise MedSSLError(f"{folder}: cannot write the summary ({exc.strerror})") from None
    return path
