"""The phantom's classes (fixed label ids, display colours) and the mean HU of each of its tissues."""

from __future__ import annotations

CLASSES: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "lung_left",
    6: "lung_right",
    7: "aorta",
    8: "nodule",
}

NODULE_LABEL = 8

# Colours close to 3D Slicer's generic anatomy colour table (0..255).
_COLORS_255 = {
    1: (221, 130, 101),  # liver
    2: (157, 108, 162),  # spleen
    3: (185, 102, 83),  # kidney left
    4: (212, 126, 103),  # kidney right (a lighter shade so both sides can be told apart)
    5: (197, 165, 145),  # lung left
    6: (172, 138, 115),  # lung right
    7: (224, 97, 76),  # aorta (artery)
    8: (144, 238, 144),  # nodule (tumour green)
}

# Mean HU written for each tissue before noise and smoothing.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft": 40.0,
    "muscle": 50.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney_medulla": 30.0,
    "kidney_cortex": 90.0,
    "lung": -865.0,
    "lung_vessel": -250.0,
    "heart": 45.0,
    "aorta": 200.0,
    "bone": 700.0,
    "disc": 90.0,
    "canal": 20.0,
    "nodule": 40.0,
}


def class_colors() -> dict[int, tuple[float, float, float]]:
    """Display colour (r, g, b in 0..1) of every class id of :data:`CLASSES`."""
    return {k: tuple(round(c / 255.0, 4) for c in rgb) for k, rgb in _COLORS_255.items()}
