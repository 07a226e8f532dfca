"""The bad-input corpus: files and folders that every ``medssl`` command must refuse cleanly.

Generated on demand (nothing is stored in the repository): :func:`build_corpus` writes each case into a
folder and returns ``{case name: path}``. ``Testing/Python/test_bad_inputs.py`` runs every command on
every case that applies and checks for a non-zero exit, a one-line reason naming the input, no
traceback, and no partial output.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _write(array_zyx: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def good_image(path: Path, shape_zyx=(16, 24, 24), seed=0) -> Path:
    """A small valid CT-like volume (int16 HU) to pair with bad labels or bad models."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape_zyx, -1000, np.int16)
    hu[:, 4:-4, 4:-4] = rng.normal(40, 20, (shape_zyx[0], shape_zyx[1] - 8, shape_zyx[2] - 8)).astype(np.int16)
    return _write(hu, path)


def build_corpus(folder: Path) -> dict[str, Path]:
    """Write every bad-input case under ``folder``; return ``{name: path}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Path] = {}
    cases["missing_path"] = folder / "does-not-exist.nii.gz"
    (empty := folder / "empty.nii.gz").write_bytes(b"")
    cases["empty_file"] = empty
    (text := folder / "notes.nii.gz").write_text("this is a text file, not an image\n", encoding="utf-8")
    cases["text_named_nii"] = text
    whole = good_image(folder / "whole.nii").read_bytes()
    (truncated := folder / "truncated.nii.gz").write_bytes(gzip.compress(whole[: len(whole) // 3]))
    cases["truncated_nifti"] = truncated
    mixed = folder / "mixed_2d_3d"
    mixed.mkdir(exist_ok=True)
    good_image(mixed / "a_volume.nii.gz")
    _write(np.zeros((24, 24), np.int16), mixed / "b_slice.nii.gz")
    cases["mixed_2d_3d"] = mixed
    cases["four_d"] = _write(np.zeros((3, 8, 8, 8), np.float32), folder / "four_d.nii.gz", (1.0, 1.0, 1.0, 1.0))
    nonfinite = np.zeros((8, 16, 16), np.float32)
    nonfinite[2, 3, 4] = np.nan
    nonfinite[5, 6, 7] = np.inf
    # NRRD: ITK's NIfTI writer would turn NaN and inf into 0
    cases["non_finite"] = _write(nonfinite, folder / "non_finite.nrrd")
    no_dicom = folder / "no_dicom"
    no_dicom.mkdir(exist_ok=True)
    (no_dicom / "readme.txt").write_text("no images here\n", encoding="utf-8")
    cases["folder_without_dicom"] = no_dicom
    cases["image"] = good_image(folder / "image.nii.gz")
    cases["label_off_grid"] = _write(np.zeros((16, 20, 24), np.uint8), folder / "label_off_grid.nii.gz")
    fractional = np.full((16, 24, 24), 255.0, np.float32)
    fractional[8] = 0.5
    cases["fractional_label"] = _write(fractional, folder / "fractional_label.nii.gz")
    cases["nothing_annotated"] = _write(np.full((16, 24, 24), 255, np.uint8), folder / "nothing_annotated.nii.gz")
    (not_model := folder / "not_a_model.pt").write_text("definitely not a checkpoint\n", encoding="utf-8")
    cases["not_a_model"] = not_model
    (empty_model := folder / "empty_model").mkdir(exist_ok=True)
    cases["empty_model_folder"] = empty_model
    broken = folder / "broken_model"
    broken.mkdir(exist_ok=True)
    (broken / "model.json").write_text('{"format": "medssl-bundle", "architecture": ', encoding="utf-8")
    (broken / "weights.safetensors").write_bytes(b"\x00" * 16)
    cases["broken_model_json"] = broken
    # a folder that cannot be created: its parent is a regular file (chmod would not stop root, as in CI)
    (blocker := folder / "a_file_not_a_folder").write_text("x", encoding="utf-8")
    cases["unwritable_output"] = blocker / "out"
    (classes := folder / "classes.json").write_text(json.dumps({"1": {"name": "liver"}}), encoding="utf-8")
    cases["classes"] = classes
    return cases
