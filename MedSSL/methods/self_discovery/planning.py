"""Self-discovery planning: which reference volume, normalised centre and neighbour volumes make each
pattern class (:func:`plan_classes`), and which crops make its instances (:func:`plan_instances`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from MedSSL.methods.self_discovery.geometry import box_fraction, crop_resized, nearest_neighbours


@dataclass
class PatternClass:
    """One anatomical pattern: a reference volume, a normalised cube centre, its member volumes."""

    reference: int
    centre: np.ndarray
    train_members: np.ndarray
    val_members: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def plan_classes(features: np.ndarray, masks_small: list, shapes: list, patch, classes: int, instances: int,
                 rng: np.random.Generator, min_body_fraction: float = 0.5, min_distance: float = 0.05,
                 max_tries: int = 200, val_features: np.ndarray | None = None, val_instances: int = 0,
                 log: Callable[[str], None] = print) -> list[PatternClass]:
    """Choose up to ``classes`` patterns among training volumes (rows of ``features``).

    For each class: a reference volume (each once before any is reused), its ``instances`` nearest
    training volumes by L2 feature distance (the reference first), and a normalised centre drawn
    uniformly where the patch fits in the reference, with at least ``min_body_fraction`` of the box
    inside the reference's body mask (``masks_small``: masks on any small grid) and at least
    ``min_distance`` (normalised units) from every earlier class centre. Up to ``max_tries``
    centres per reference; a reference that fails is replaced by the next one. Returns fewer classes
    when no more centres can be found.
    """
    n = len(features)
    patch = np.asarray(patch, dtype=np.float64)
    k = min(int(instances), n)
    k_val = min(int(val_instances), 0 if val_features is None else len(val_features))
    found: list[PatternClass] = []
    order = list(rng.permutation(n))
    failures_in_a_row = 0
    while len(found) < classes:
        if not order:
            order = list(rng.permutation(n))
        ref = int(order.pop(0))
        half = np.minimum(patch / (2.0 * np.asarray(shapes[ref], dtype=np.float64)), 0.5)
        centre = None
        for _ in range(int(max_tries)):
            c = rng.uniform(half, 1.0 - half)
            if any(np.linalg.norm(c - p.centre) < min_distance for p in found):
                continue
            if box_fraction(masks_small[ref], c, half) < min_body_fraction:
                continue
            centre = c
            break
        if centre is None:
            failures_in_a_row += 1
            if failures_in_a_row >= max(n, 3):
                log(f"self-discovery: found only {len(found)} of {classes} pattern classes (no further place with "
                    f"enough body at least {min_distance:g} from the others)")
                break
            continue
        failures_in_a_row = 0
        members = nearest_neighbours(features, features[ref], k)
        val_members = (nearest_neighbours(val_features, features[ref], k_val)
                       if k_val else np.zeros(0, dtype=np.int64))
        found.append(PatternClass(ref, np.asarray(centre, dtype=np.float64), members, val_members))
    return found


# --------------------------------------------------------------------------------------------------
# instances
# --------------------------------------------------------------------------------------------------


@dataclass
class Instance:
    label: int
    volume: int  # index into the split's volume list
    split: int  # 0 train, 1 validation
    resolution: int  # 0 = the cube itself, 1.. = multi-resolution crops
    centre: np.ndarray  # the class's normalised centre
    size: tuple  # crop size in voxels before resizing to the patch
    shift_voxels: tuple = (0.0, 0.0)  # in-plane shift of a multi-resolution crop, voxels


def plan_instances(classes: list[PatternClass], patch, multi_resolution: int, size_range, shift,
                   rng: np.random.Generator) -> list[Instance]:
    """All crops: per class, the cube in every member (train and validation) at the class centre,
    plus ``multi_resolution - 1`` extra in-plane windows per training member (published: 2 extra of
    in-plane size U[50, 80) voxels for a 64-voxel cube, shifted by U[-10, 10) voxels, same slices,
    resized to the cube). Here sizes are ``U(size_range) * patch`` and shifts ``U(-shift, shift) *
    patch`` voxels in X and Y."""
    patch = tuple(int(p) for p in patch)
    out: list[Instance] = []
    for label, cls in enumerate(classes):
        for v in cls.train_members:
            out.append(Instance(label, int(v), 0, 0, cls.centre.copy(), patch))
            for r in range(1, int(multi_resolution)):
                frac = rng.uniform(size_range[0], size_range[1])
                sx, sy = (max(2, int(round(frac * p))) for p in patch[:2])
                dx, dy = (float(rng.uniform(-shift, shift) * p) for p in patch[:2])
                out.append(Instance(label, int(v), 0, r, cls.centre.copy(), (sx, sy, patch[2]), (dx, dy)))
        for v in cls.val_members:
            out.append(Instance(label, int(v), 1, 0, cls.centre.copy(), patch))
    return out


def crop_instance(array01: np.ndarray, inst: Instance, patch) -> np.ndarray:
    """The (patch) float32 cube of ``inst`` from its volume's normalised array."""
    centre = np.asarray(inst.centre, dtype=np.float64).copy()
    centre[0] += inst.shift_voxels[0] / array01.shape[0]
    centre[1] += inst.shift_voxels[1] / array01.shape[1]
    return crop_resized(array01, centre, inst.size, patch)
