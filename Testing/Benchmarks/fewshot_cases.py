"""The few-shot benchmark's suite of real cases from ``../shared/data`` (read, never copied).

Each case is an image, a reference label map with its classes, and the axis a user would paint on
(the acquisition's axial slices). :func:`paint` makes what a user paints: ``k`` planes spread over the
structure and inset from its ends (``linspace`` over the structure's extent with the two ends dropped),
every voxel of those planes labelled, 255 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass
class Case:
    """image: (X, Y, Z) float32; truth: (X, Y, Z) uint8 class values; spacing (3,) mm; axis: painted axis."""

    name: str
    image: np.ndarray
    truth: np.ndarray
    spacing: np.ndarray
    axis: int
    classes: dict
    source: str


def _read(path):
    from MedSSL.io.volumes import read_volume

    return read_volume(path)


def _case(name, image_file, label_file, values: dict, axis: int, source: str, root: Path) -> Case:
    image, label = _read(root / image_file), _read(root / label_file)
    truth = np.zeros(label.shape, np.uint8)
    for new, old in enumerate(values, start=1):
        truth[np.round(label.array).astype(np.int64) == old] = new
    classes = {str(i): n for i, n in enumerate(values.values(), start=1)}
    return Case(name, image.array.astype(np.float32), truth, np.asarray(image.spacing, float), axis, classes, source)


def _brain(root: Path) -> Case:
    scan = np.load(root / "voxelmorph_brain" / "test_scan.npz")
    seg = np.round(scan["seg"]).astype(np.int64)
    truth = np.zeros(seg.shape, np.uint8)
    names = {50: "right caudate", 51: "right putamen", 49: "right thalamus"}
    for new, old in enumerate(names, start=1):
        truth[seg == old] = new
    # axis 0 runs left-right, axis 1 superior-inferior (the brainstem is at high indices): axial = axis 1
    return Case("brain_nuclei_t1", scan["vol"].astype(np.float32), truth, np.ones(3), 1,
                {str(i): n for i, n in enumerate(names.values(), start=1)}, "voxelmorph, FreeSurfer (silver)")


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """Both lungs of a chest CT (X, Y, Z) in HU, derived: air below -400 HU, minus the air connected to the
    image border (outside the body), slice-wise holes (vessels) filled, the two largest 3D components kept."""
    from scipy import ndimage

    air = hu < -400
    comp, n = ndimage.label(air)
    border = np.unique(np.concatenate([comp[0].ravel(), comp[-1].ravel(), comp[:, 0].ravel(), comp[:, -1].ravel()]))
    inside = air & ~np.isin(comp, border)
    comp, n = ndimage.label(inside)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    keep = np.argsort(sizes)[::-1][:2]
    lungs = np.isin(comp, keep[sizes[keep] > 0.05 * sizes.max()])
    for k in range(lungs.shape[2]):
        lungs[..., k] = ndimage.binary_fill_holes(lungs[..., k])
    return lungs


def _lungs(root: Path) -> Case:
    image = _read(root / "itkelastix_thorax_ct" / "thorax_ct_00_2xdown.nii.gz")
    truth = lung_mask(image.array.astype(np.float32)).astype(np.uint8)
    return Case("lungs_ct", image.array.astype(np.float32), truth, np.asarray(image.spacing, float), 2, {"1": "lungs"},
                "ITKElastix thorax CT, mask derived (threshold -400 HU, body air, 2 largest)")


def load_cases(root: Path = DATA, names=None) -> list[Case]:
    """The suite (or the named cases); an empty list when ``root`` is absent."""
    if not root.is_dir():
        return []
    makers = {
        "spleen_ct": lambda: _case("spleen_ct", "msd_spleen_ivadomed/sub-spleen2_ct.nii.gz",
                                   "msd_spleen_ivadomed/sub-spleen2_ct_seg-manual.nii.gz", {1: "spleen"}, 2,
                                   "MSD Task09 (expert)", root),
        "edema_flair": lambda: _case("edema_flair", "brats2021_sammed3d/BraTS2021_01646_flair.nii.gz",
                                     "brats2021_sammed3d/BraTS2021_01646_edema.nii.gz", {1: "edema"}, 2,
                                     "BraTS 2021 (expert)", root),
        "cord_t2w": lambda: _case("cord_t2w", "spinegeneric_mr_ivadomed/sub-unf01_T2w.nii.gz",
                                  "spinegeneric_mr_ivadomed/sub-unf01_T2w_seg-manual.nii.gz", {1: "spinal cord"}, 2,
                                  "spine-generic (manual)", root),
        "brain_nuclei_t1": lambda: _brain(root),
        "liver_ct": lambda: _case("liver_ct", "totalseg_examples/example_ct.nii.gz",
                                  "totalseg_examples/example_seg_fast_force_split.nii.gz", {5: "liver"}, 2,
                                  "TotalSegmentator example (model output)", root),
        "kidney_ct": lambda: _case("kidney_ct", "totalseg_examples/example_ct.nii.gz",
                                   "totalseg_examples/example_seg_fast_force_split.nii.gz", {2: "right kidney"}, 2,
                                   "TotalSegmentator example (model output)", root),
        "lungs_ct": lambda: _lungs(root),
    }
    return [makers[n]() for n in (names or makers)]


def paint(truth: np.ndarray, axis: int, k: int) -> tuple[np.ndarray, list[int]]:
    """``k`` planes along ``axis`` spread over the structure, inset from its ends; 255 elsewhere."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero((truth > 0).any(axis=other))
    picks = sorted(set(np.round(np.linspace(present[0], present[-1], k + 2)[1:-1]).astype(int).tolist()))
    sparse = np.full(truth.shape, 255, np.uint8)
    index = [slice(None)] * 3
    index[axis] = picks
    sparse[tuple(index)] = truth[tuple(index)]
    return sparse, picks


def every_other(truth: np.ndarray, axis: int) -> tuple[np.ndarray, list[int]]:
    """The upper bound's painting: every other plane along ``axis`` (even indices)."""
    picks = list(range(0, truth.shape[axis], 2))
    sparse = np.full(truth.shape, 255, np.uint8)
    index = [slice(None)] * 3
    index[axis] = picks
    sparse[tuple(index)] = truth[tuple(index)]
    return sparse, picks


def dice_unpainted(pred: np.ndarray, truth: np.ndarray, axis: int, painted: list[int]) -> float:
    """Mean over classes of the Dice on the planes not painted (a class absent from both scores 1)."""
    keep = np.ones(truth.shape[axis], bool)
    keep[painted] = False
    p, t = np.compress(keep, pred, axis=axis), np.compress(keep, truth, axis=axis)
    scores = []
    for c in [int(v) for v in np.unique(truth) if v > 0]:
        a, b = p == c, t == c
        total = a.sum() + b.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total)
    return float(np.mean(scores))
