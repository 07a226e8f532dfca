"""A seeded, procedural CT-like phantom of the thoraco-abdominal junction (no download needed).

Used by ``medssl demo`` and by the tests. ``make_phantom(seed)`` builds, in well under a second for the
default 96 x 96 x 64 grid:

* ``image``: int16 Hounsfield units. Air -1000, subcutaneous fat about -100, soft tissue 30-60,
  liver ~60, spleen ~50, kidneys ~30 with a brighter cortex (~90), lungs ~-850 with a vessel-like
  texture, contrast-filled aorta ~200, spine and ribs ~700, a few lung nodules ~+40 (4-10 mm radius).
  Gaussian noise (about 15 HU after a mild smoothing that also blurs the edges like partial volume).
* ``labels``: uint8 on the same grid with the fixed ids of :data:`CLASSES`.
* ``nodules``: one dict per nodule with ``center_mm`` (LPS, mm), ``radius_mm`` and ``label`` (8).

The anatomy is laid out in physical (LPS) space around the centre of the field of view, scaled to it:
patient left is +x (spleen, left kidney and left lung at +x), posterior is +y (spine), superior is +z
(lungs above the diaphragm, abdomen below). Any ``direction`` (orthonormal columns) is honoured, so a
flipped or permuted grid shows the same patient. Organs are ellipsoids whose coordinates are warped by a
smooth, seed-dependent low-frequency field and whose surfaces carry seed-dependent bumps, so shapes vary
with the seed while the same seed always gives the same arrays. The body is a deformed elliptic cylinder
surrounded by air, so a content filter has air to reject.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from MedSSL.errors import MedSSLError
from MedSSL.io.atomic import atomic_write_text
from MedSSL.data.phantom_classes import CLASSES, HU, NODULE_LABEL, class_colors
from MedSSL.data.phantom_grid import PhantomGrid, check_geometry, coarse_noise
from MedSSL.io.volumes import Volume, write_volume


@dataclass
class Phantom:
    """A phantom scan: ``image`` (int16 HU), ``labels`` (uint8, same grid), the class names and nodules."""

    image: Volume
    labels: Volume
    classes: dict = field(default_factory=lambda: dict(CLASSES))
    nodules: list = field(default_factory=list)
    seed: int = 0


def make_phantom(seed: int = 0, shape=(96, 96, 64), spacing=(2.0, 2.0, 3.0), origin=None, direction=None) -> Phantom:
    """Build the phantom for ``seed`` on the given grid (origin default: field of view centred on 0)."""
    shape, spacing, origin, direction = check_geometry(shape, spacing, origin, direction)
    rng = np.random.default_rng(seed)
    g = PhantomGrid(shape, spacing, origin, direction)

    # Smoothly warped normalised coordinates: the whole anatomy bends a little, differently per seed.
    u = g.affine([1, 0, 0]) + 0.035 * g.smooth_field(rng, 3)
    v = g.affine([0, 1, 0]) + 0.035 * g.smooth_field(rng, 3)
    w = g.affine([0, 0, 1]) + 0.035 * g.smooth_field(rng, 3)
    bumps = g.smooth_field(rng, 4, cycles=(1.0, 2.5))  # shared surface roughness
    jitter = lambda scale=0.03: float(rng.uniform(-scale, scale))  # noqa: E731

    hu = np.full(shape, HU["air"], dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)

    def ellipsoid(center, axes, rough=0.08):
        phase = rng.uniform(-1, 1)
        d = ((u - (center[0] + jitter())) / axes[0]) ** 2
        d += ((v - (center[1] + jitter())) / axes[1]) ** 2
        d += ((w - (center[2] + jitter())) / axes[2]) ** 2
        return d, d <= (1.0 + rough * (bumps * np.float32(phase) + 0.3 * jitter(1.0))) ** 2

    # --- body: deformed elliptic cylinder along z ------------------------------------------------------
    bu, bv = 0.86 + jitter(0.04), 0.64 + jitter(0.04)
    r_body = np.sqrt((u / bu) ** 2 + ((v - 0.02) / bv) ** 2) * (1.0 - 0.03 * bumps)
    body = r_body <= 1.0
    hu[body] = HU["fat"]
    hu[r_body <= 0.92] = HU["muscle"]
    interior = r_body <= 0.84
    hu[interior] = HU["soft"]
    fat_field = coarse_noise(rng, shape, max(3.0, 8.0 * 2.0 / float(np.mean(spacing))))
    abdomen_fat = interior & (fat_field > 0.9) & (w < 0.0)
    hu[abdomen_fat] = HU["fat"] + 20.0

    # --- diaphragm domes (right side higher, above the liver) ------------------------------------------
    def dome(side):
        cu = side * 0.40
        base = -0.30 if side > 0 else -0.20
        return base + jitter(0.05) + 0.30 * (1.0 - ((u - cu) / 0.34) ** 2 - ((v - 0.05) / 0.55) ** 2)

    dome_left, dome_right = dome(+1), dome(-1)

    # --- lungs ------------------------------------------------------------------------------------------
    taper = 1.0 - 0.12 * np.clip(w - 0.5, 0.0, None)
    lungs = np.zeros(shape, dtype=bool)
    for side, label, top in ((+1, 5, dome_left), (-1, 6, dome_right)):
        cu, cv = side * (0.40 + jitter(0.02)), 0.06 + jitter(0.03)
        cross = ((u - cu) / (0.30 * taper)) ** 2 + ((v - cv) / (0.50 * taper)) ** 2
        lung = (cross <= (1.0 + 0.06 * bumps) ** 2) & (w > top) & (r_body <= 0.80)
        lab[lung] = label
        lungs |= lung
    lung_hu = HU["lung"] + 25.0 * v  # slightly denser posteriorly (gravity)
    hu[lungs] = lung_hu[lungs]
    step = max(2.0, 4.0 * 2.0 / float(np.mean(spacing)))
    f1, f2 = coarse_noise(rng, shape, step), coarse_noise(rng, shape, step)
    vessels = lungs & (np.abs(f1) < 0.2) & (np.abs(f2) < 0.2)
    hu[vessels] = HU["lung_vessel"]

    # --- heart (unlabelled) carves the lungs -------------------------------------------------------------
    _, heart = ellipsoid((0.10, -0.22, 0.12), (0.30, 0.30, 0.32))
    heart &= w > -0.25
    hu[heart] = HU["heart"]
    lab[heart] = 0

    # --- abdominal organs under the diaphragm ------------------------------------------------------------
    _, liver = ellipsoid((-0.34, -0.02, -0.50), (0.50, 0.55, 0.62))
    liver &= (w <= dome_right) & (r_body <= 0.83)
    hu[liver] = HU["liver"]
    lab[liver] = 1

    _, spleen = ellipsoid((0.52, 0.30, -0.34), (0.18, 0.26, 0.34), rough=0.12)
    spleen &= (w <= dome_left) & (r_body <= 0.83)
    hu[spleen] = HU["spleen"]
    lab[spleen] = 2

    for side, label in ((+1, 3), (-1, 4)):
        d, kidney = ellipsoid((side * 0.33, 0.40, -0.62 - (0.06 if side < 0 else 0.0)), (0.13, 0.16, 0.32), rough=0.05)
        kidney &= r_body <= 0.83
        hu[kidney] = HU["kidney_cortex"]
        hu[kidney & (d < 0.45)] = HU["kidney_medulla"]
        lab[kidney] = label

    # --- aorta: contrast-filled tube along z, anterior-left of the spine ----------------------------------
    x, y = u * np.float32(g.half[0]), v * np.float32(g.half[1])  # mm from the centre (warped)
    r_aorta = 0.075 * g.hmin * (1.0 + jitter(0.1))
    ax, ay = (0.06 + jitter(0.02)) * g.half[0], (0.27 + jitter(0.02)) * g.half[1]
    aorta = ((x - ax) ** 2 + (y - ay + 0.03 * g.half[1] * w) ** 2) <= r_aorta**2
    aorta &= r_body <= 0.83
    hu[aorta] = HU["aorta"]
    lab[aorta] = 7

    # --- spine: vertebral bodies with discs, canal and posterior arch; ribs in the thorax -----------------
    z_mm = w * np.float32(g.half[2])
    r_vb = 0.12 * g.hmin
    sy = 0.50 * g.half[1]
    d_vb = np.sqrt(x**2 + (y - sy) ** 2)
    period, disc_phase = 28.0, rng.uniform(0, 28.0)
    disc = np.abs(((z_mm + disc_phase) % period) - period / 2) < 3.0
    vertebra = d_vb <= r_vb
    canal_y = sy + r_vb + 0.045 * g.hmin
    d_canal = np.sqrt(x**2 + (y - canal_y) ** 2)
    arch = (d_canal <= 0.085 * g.hmin) | ((np.abs(x) <= 0.03 * g.hmin) & (y >= canal_y) & (r_body <= 0.93))
    bone = (vertebra & ~disc) | (arch & ~disc)
    hu[vertebra & disc] = HU["disc"]
    hu[bone] = HU["bone"]
    hu[d_canal <= 0.045 * g.hmin] = HU["canal"]
    lab[vertebra | arch] = 0

    rib_phase = rng.uniform(0, 2 * np.pi)
    ribs = (r_body >= 0.81) & (r_body <= 0.87) & (w > -0.55)
    ribs &= np.cos(2 * np.pi * (z_mm - 6.0 * v) / 30.0 + rib_phase) > 0.55
    ribs &= ~((v < -0.2) & (np.abs(u) < 0.3))  # no ribs over the sternum (cartilage)
    hu[ribs] = HU["bone"] - 50.0
    lab[ribs & (lab != 0)] = 0

    # --- lung nodules -------------------------------------------------------------------------------------
    nodules = _place_nodules(rng, g, lab, hu)

    # --- noise, mild smoothing, HU range --------------------------------------------------------------------
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(45.0)
    hu = ndimage.gaussian_filter(hu, sigma=0.6, truncate=3.0)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    geometry = dict(spacing=spacing.copy(), origin=origin.copy(), direction=direction.copy())
    return Phantom(
        image=Volume(image, modality="CT", **geometry),
        labels=Volume(lab, modality=None, **{k: v.copy() for k, v in geometry.items()}),
        classes=dict(CLASSES),
        nodules=nodules,
        seed=int(seed),
    )


def _place_nodules(rng, g: PhantomGrid, lab: np.ndarray, hu: np.ndarray) -> list[dict]:
    """Put 2-4 spheres (4-10 mm radius) entirely inside the lungs; returns their descriptions."""
    wanted = int(rng.integers(2, 5))
    lung_idx = np.flatnonzero((lab == 5) | (lab == 6))
    nodules: list[dict] = []
    if lung_idx.size == 0:
        return nodules
    spacing = g.spacing
    tries = 0
    while len(nodules) < wanted and tries < 60:
        tries += 1
        radius = float(rng.uniform(4.0, 10.0))
        center = np.array(np.unravel_index(int(rng.choice(lung_idx)), lab.shape), dtype=np.float64)
        center += rng.uniform(-0.5, 0.5, size=3)
        reach = np.ceil(radius / spacing).astype(int) + 1
        lo = np.maximum(np.floor(center).astype(int) - reach, 0)
        hi = np.minimum(np.floor(center).astype(int) + reach + 1, lab.shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        ii, jj, kk = (np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi))
        # the direction is orthonormal, so physical distances only need the spacing
        d2 = (((ii - center[0]) * spacing[0]) ** 2)[:, None, None] + (((jj - center[1]) * spacing[1]) ** 2)[None, :, None]
        d2 = d2 + (((kk - center[2]) * spacing[2]) ** 2)[None, None, :]
        sphere = d2 <= radius**2
        if not sphere.any():
            continue
        # the whole sphere inside the grid, and the sphere plus a one-voxel margin inside the lungs
        if np.any(center - radius / spacing < 0) or np.any(center + radius / spacing > np.asarray(lab.shape) - 1):
            continue
        margin = d2 <= (radius + float(spacing.min())) ** 2
        region = lab[box]
        if not np.all((region[margin] == 5) | (region[margin] == 6)):
            continue
        region[sphere] = NODULE_LABEL
        hu[box][sphere] = HU["nodule"]
        center_mm = g.origin + g.direction @ (spacing * center)
        nodules.append(
            {
                "center_mm": [round(float(c), 3) for c in center_mm],
                "center_index": [round(float(c), 3) for c in center],
                "radius_mm": round(radius, 3),
                "label": NODULE_LABEL,
            }
        )
    return nodules


def _write_json(path: Path, data) -> None:
    try:
        atomic_write_text(path, json.dumps(data, indent=1))
    except OSError as exc:
        raise MedSSLError(f"{path}: cannot write ({exc.strerror})") from None


def write_phantom(phantom: Phantom, folder, name: str = "phantom") -> tuple[Path, Path, Path]:
    """Write ``<name>_ct.nii.gz``, ``<name>_labels.nii.gz`` and ``<name>_classes.json`` into ``folder``.

    The classes file maps each id (as a string) to ``{"name": ..., "color": [r, g, b]}`` (0..1).
    Returns the three paths.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSSLError(f"{folder}: cannot create the output folder ({exc.strerror})") from None
    image_path = folder / f"{name}_ct.nii.gz"
    label_path = folder / f"{name}_labels.nii.gz"
    classes_path = folder / f"{name}_classes.json"
    write_volume(phantom.image, image_path)
    write_volume(phantom.labels, label_path)
    colors = class_colors()
    classes = {
        str(k): {"name": n, "color": list(colors.get(k, (0.5, 0.5, 0.5)))} for k, n in sorted(phantom.classes.items())
    }
    _write_json(classes_path, classes)
    return image_path, label_path, classes_path
