"""A predicted label volume on the truth's grid: kept when the grids match, else resampled by physical
position (nearest neighbour), for ``medssl evaluate --pred``."""

from __future__ import annotations

import sys

import numpy as np

from MedSSL.errors import MedSSLError


def grid_coverage(pred_volume, truth_volume) -> float:
    """Fraction of the truth's voxels whose centre lies inside the prediction's grid."""
    import SimpleITK as sitk

    from MedSSL.io.volumes import to_sitk

    ones = to_sitk(pred_volume.with_array(np.ones(pred_volume.shape, dtype=np.uint8)))
    reference = sitk.Image([int(s) for s in truth_volume.shape], sitk.sitkUInt8)
    reference.SetSpacing([float(s) for s in truth_volume.spacing])
    reference.SetOrigin([float(o) for o in truth_volume.origin])
    reference.SetDirection([float(d) for d in truth_volume.direction.reshape(-1)])
    covered = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return float(sitk.GetArrayViewFromImage(covered).mean())


def align_prediction(pred_volume, truth_volume, pred_name: str, log=None):
    """``pred_volume`` on the truth's grid: as it is when the grids match, else resampled by physical
    position with nearest neighbour (outside the prediction's grid = 0), which is logged. MedSSLError
    when the two grids do not overlap."""
    from MedSSL.io.volumes import resample_to_grid

    if pred_volume.same_grid(truth_volume):
        return pred_volume
    coverage = grid_coverage(pred_volume, truth_volume)
    if coverage == 0.0:
        raise MedSSLError(f"{pred_name}: does not overlap the truth's grid in physical space (check the pairing)")
    resampled = resample_to_grid(pred_volume, truth_volume, nearest=True, default=0)
    (log or _stderr)(
        f"{pred_name}: not on the truth's grid (shape {list(pred_volume.shape)} vs {list(truth_volume.shape)}); "
        f"resampled by physical position with nearest neighbour ({coverage:.0%} of the truth covered)"
    )
    return resampled


def _stderr(message: str) -> None:
    sys.stderr.write(f"medssl evaluate: {message}\n")
