"""medssl evaluate and MedSSL.tasks.evaluate: metrics against hand computations, FROC, AUC, interpolation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from MedSSL.commands.cli import main
from MedSSL.errors import MedSSLError
from MedSSL.tasks.evaluate.classification import classification_metrics, roc_auc
from MedSSL.tasks.evaluate.detection import froc_from_files
from MedSSL.tasks.evaluate.interpolation import interpolate_between_slices
from MedSSL.tasks.evaluate.metrics import segmentation_metrics
from MedSSL.tasks.evaluate.surface_distances import surface_distances, surface_distances_with_unscored
from MedSSL.io.volumes import Volume, write_volume

PNG = b"\x89PNG\r\n\x1a\n"


def _volume(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    return Volume(np.asarray(array), np.array(spacing, float), np.array(origin, float),
                  np.eye(3) if direction is None else np.asarray(direction, float))


def _surface_by_hand(mask):
    """Voxels of ``mask`` with a 6-neighbour outside it (or off the array)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _hd95_asd_by_hand(a, b, spacing):
    pa = np.argwhere(_surface_by_hand(a)) * spacing
    pb = np.argwhere(_surface_by_hand(b)) * spacing
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    ab, ba = d.min(axis=1), d.min(axis=0)
    return max(np.percentile(ab, 95), np.percentile(ba, 95)), np.concatenate([ab, ba]).mean()


# --- segmentation ------------------------------------------------------------------------------

def test_dice_iou_of_overlapping_cubes_match_hand_computation():
    truth = np.zeros((20, 20, 20), np.uint8)
    pred = truth.copy()
    truth[2:8, 2:8, 2:8] = 1  # 216 voxels
    pred[4:10, 2:8, 2:8] = 1  # shifted by 2 along x: 4 * 6 * 6 = 144 shared
    result = segmentation_metrics(pred, truth, (1.0, 1.0, 1.0))
    entry = result["per_class"]["1"]
    assert entry["dice"] == pytest.approx(2 * 144 / (216 + 216))
    assert entry["iou"] == pytest.approx(144 / (216 + 216 - 144))
    assert entry["truth_voxels"] == 216 and entry["pred_voxels"] == 216
    assert result["mean_dice"] == pytest.approx(2 / 3)


def test_surface_distances_of_shifted_plates_are_the_shift_in_mm():
    spacing = (0.7, 0.5, 2.5)
    truth = np.zeros((12, 12, 12), np.uint8)
    pred = truth.copy()
    truth[2:8, 2:8, 3] = 1
    pred[2:8, 2:8, 5] = 1  # 2 slices of 2.5 mm
    entry = segmentation_metrics(pred, truth, spacing)["per_class"]["1"]
    assert entry["hd95_mm"] == pytest.approx(5.0) and entry["asd_mm"] == pytest.approx(5.0)
    truth = np.zeros((12, 12, 12), np.uint8)
    pred = truth.copy()
    truth[4, 2:8, 2:8] = 1
    pred[7, 2:8, 2:8] = 1  # 3 columns of 0.7 mm
    entry = segmentation_metrics(pred, truth, spacing)["per_class"]["1"]
    assert entry["hd95_mm"] == pytest.approx(2.1, abs=1e-5) and entry["asd_mm"] == pytest.approx(2.1, abs=1e-5)


def test_hd95_asd_of_shifted_cubes_with_anisotropic_spacing_match_brute_force():
    spacing = np.array([0.8, 1.0, 2.5])
    truth = np.zeros((16, 16, 14), bool)
    pred = truth.copy()
    truth[3:10, 4:11, 3:9] = True
    pred[4:11, 4:11, 5:11] = True  # shifted 1 voxel (0.8 mm) in x and 2 slices (5 mm) in z
    hd95, asd = _hd95_asd_by_hand(pred, truth, spacing)
    entry = segmentation_metrics(pred.astype(np.int16) * 3, truth.astype(np.int16) * 3, spacing)["per_class"]["3"]
    assert entry["hd95_mm"] == pytest.approx(hd95, rel=1e-5)
    assert entry["asd_mm"] == pytest.approx(asd, rel=1e-5)
    # the edge-aware path used with unannotated voxels equals MONAI's when nothing is unannotated
    assert surface_distances_with_unscored(pred, truth, np.zeros_like(truth), spacing) == pytest.approx(surface_distances(pred, truth, spacing), rel=1e-5)


def test_one_slice_images_are_scored_in_2d():
    """A radiograph is (X, Y, 1): its surfaces are in-plane contours, so a disc shifted by 3 pixels of
    0.5 mm has HD95 1.5 mm, exactly MONAI's 2D value, and spacing_mm still reports all three axes."""
    yy, xx = np.mgrid[:40, :40]
    truth = ((xx - 20) ** 2 + (yy - 20) ** 2 <= 64).astype(np.uint8)
    pred = np.roll(truth, 3, axis=0)
    m = segmentation_metrics(pred[:, :, None], truth[:, :, None], spacing=(0.5, 0.5, 2.0))
    hd95, asd = surface_distances(pred.astype(bool), truth.astype(bool), (0.5, 0.5))
    entry = m["per_class"]["1"]
    assert entry["hd95_mm"] == pytest.approx(hd95, abs=1e-5) and entry["asd_mm"] == pytest.approx(asd, abs=1e-5)
    assert entry["hd95_mm"] == pytest.approx(1.5, abs=1e-5) and m["spacing_mm"] == [0.5, 0.5, 2.0]
    ignored = truth[:, :, None].copy()
    ignored[:10] = 255  # unannotated rows: still 2D, no artificial contour along the cut
    masked = segmentation_metrics(pred[:, :, None], ignored, spacing=(0.5, 0.5, 2.0))["per_class"]["1"]
    assert masked["hd95_mm"] == pytest.approx(1.5, abs=1e-5)


def test_unannotated_truth_voxels_are_not_scored():
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[4:12, 4:12, 4:12] = 1
    pred = truth.copy()
    pred[0:3, 0:3, 0:3] = 1  # a false positive...
    truth[0:3, 0:3, 0:3] = 255  # ...where the truth is not annotated
    truth[:, :, 7] = 255  # an unannotated slice through the object: no artificial surface
    result = segmentation_metrics(pred, truth, (1.0, 1.0, 2.0))
    entry = result["per_class"]["1"]
    assert list(result["per_class"]) == ["1"]
    assert entry["dice"] == pytest.approx(1.0) and entry["hd95_mm"] == 0.0 and entry["asd_mm"] == 0.0
    assert entry["pred_voxels"] == entry["truth_voxels"] == 8 * 8 * 7
    assert result["ignored_voxels"] == 27 + 16 * 16
    everything = segmentation_metrics(pred, np.where(truth == 255, 0, truth), (1.0, 1.0, 2.0), ignore_value=None)
    assert everything["per_class"]["1"]["dice"] < 1.0
    masked = segmentation_metrics(np.ma.masked_array(pred, truth == 255), np.where(truth == 255, 0, truth), (1, 1, 2))
    assert masked["per_class"]["1"]["dice"] == pytest.approx(1.0)


def test_empty_classes_follow_the_documented_rules():
    truth = np.zeros((10, 10, 10), np.uint8)
    pred = truth.copy()
    truth[2:5, 2:5, 2:5] = 1
    pred[2:5, 2:5, 2:5] = 1
    pred[6:8, 6:8, 6:8] = 2  # class 2 only in the prediction
    result = segmentation_metrics(pred, truth, None, labels=[1, 2, 3])
    one, two, three = (result["per_class"][k] for k in ("1", "2", "3"))
    assert one["dice"] == pytest.approx(1.0)
    assert two["dice"] == 0.0 and two["hd95_mm"] is None and two["scored"]
    assert three["dice"] == 1.0 and not three["scored"] and three["asd_mm"] is None
    assert result["mean_dice"] == pytest.approx(0.5)  # classes 1 and 2; 3 is absent from both
    assert result["mean_hd95_mm"] == 0.0


def test_non_integer_prediction_is_refused():
    with pytest.raises(MedSSLError, match="not a label map"):
        segmentation_metrics(np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4), np.uint8), None)


def _write_pair(tmp_path):
    truth = np.zeros((20, 20, 12), np.uint8)
    truth[4:12, 4:12, 3:8] = 1
    truth[14:18, 14:18, 2:6] = 2
    pred = truth.copy()
    pred[4:12, 4:12, 8] = 1
    write_volume(_volume(truth, (0.8, 0.8, 2.0), (-5.0, 3.0, 10.0)), tmp_path / "truth.nii.gz")
    write_volume(_volume(pred, (0.8, 0.8, 2.0), (-5.0, 3.0, 10.0)), tmp_path / "pred.nii.gz")
    return truth, pred


def test_cli_segmentation_writes_json_and_png(tmp_path, capsys):
    truth, pred = _write_pair(tmp_path)
    out, fig = tmp_path / "out" / "metrics.json", tmp_path / "dice.png"
    rc = main(["evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--truth", str(tmp_path / "truth.nii.gz"),
               "--json", str(out), "--figure", str(fig), "--classes", '{"1": "liver", "2": {"name": "spleen"}}'])
    assert rc == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["per_class"]) == {"1", "2"}
    entry = result["per_class"]["1"]
    assert set(entry) >= {"dice", "iou", "hd95_mm", "asd_mm", "truth_voxels", "pred_voxels"}
    assert entry["name"] == "liver" and result["per_class"]["2"]["name"] == "spleen"
    assert entry["dice"] == pytest.approx(2 * 320 / (320 + 384))
    assert result["per_class"]["2"]["dice"] == pytest.approx(1.0)
    assert result["mean_dice"] == pytest.approx((entry["dice"] + 1.0) / 2)
    assert result["prediction_resampled"] is False
    assert fig.read_bytes().startswith(PNG)
    assert "liver" in capsys.readouterr().out


def test_cli_resamples_a_prediction_on_another_grid(tmp_path, capsys):
    truth, _ = _write_pair(tmp_path)
    # the same labels on a cropped grid: voxel (5, 5, 0) of the truth is (0, 0, 0) here
    write_volume(_volume(truth[5:, 5:, :], (0.8, 0.8, 2.0), (-5.0 + 4.0, 3.0 + 4.0, 10.0)), tmp_path / "crop.nii.gz")
    out = tmp_path / "m.json"
    rc = main(["evaluate", "--pred", str(tmp_path / "crop.nii.gz"), "--truth", str(tmp_path / "truth.nii.gz"), "--json", str(out)])
    assert rc == 0
    assert "resampled" in capsys.readouterr().err
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["prediction_resampled"] is True
    assert result["per_class"]["2"]["dice"] == pytest.approx(1.0)  # wholly inside the cropped grid
    assert result["per_class"]["1"]["pred_voxels"] == 7 * 7 * 5  # the crop cut the first row/column


@pytest.mark.parametrize("case", ["missing", "float", "far", "detections", "csv"])
def test_cli_bad_inputs_exit_2_and_leave_no_output(tmp_path, capsys, case):
    truth, pred = _write_pair(tmp_path)
    args = ["evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--truth", str(tmp_path / "truth.nii.gz")]
    if case == "missing":
        args[2], named = str(tmp_path / "nope.nii.gz"), "nope.nii.gz"
    elif case == "float":
        write_volume(_volume(pred * 0.5, (0.8, 0.8, 2.0), (-5.0, 3.0, 10.0)), tmp_path / "prob.nii.gz")
        args[2], named = str(tmp_path / "prob.nii.gz"), "prob.nii.gz"
    elif case == "far":
        write_volume(_volume(pred, (0.8, 0.8, 2.0), (500.0, 3.0, 10.0)), tmp_path / "far.nii.gz")
        args[2], named = str(tmp_path / "far.nii.gz"), "far.nii.gz"
    elif case == "detections":
        (tmp_path / "det.json").write_text('{"center_mm": [1, 2, 3]}', encoding="utf-8")
        args = ["evaluate", "--detections", str(tmp_path / "det.json"), "--truth", str(tmp_path / "truth.nii.gz")]
        named = "det.json"
    else:
        (tmp_path / "r.csv").write_text("truth,score\n0,0.1\n1,abc\n", encoding="utf-8")
        args, named = ["evaluate", "--classification", str(tmp_path / "r.csv")], "r.csv"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(args + ["--json", str(tmp_path / "out.json"), "--figure", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("medssl: error:") and named in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- detection FROC ----------------------------------------------------------------------------

def test_froc_on_a_hand_made_case(tmp_path):
    geometry = dict(spacing=(0.5, 0.5, 2.0), origin=(-10.0, 5.0, 3.0), direction=np.diag([-1.0, -1.0, 1.0]))
    a = np.zeros((30, 30, 10), np.uint8)
    a[2:6, 2:6, 2:4] = 1  # lesion A1
    a[20:25, 20:25, 5:8] = 1  # lesion A2
    b = np.zeros((30, 30, 10), np.uint8)
    b[10:14, 10:14, 3:6] = 1  # lesion B1
    b[25:30, 0:5, 0:3] = 255  # not annotated
    va, vb = _volume(a, **geometry), _volume(b, **geometry)
    write_volume(va, tmp_path / "a.nii.gz")
    write_volume(vb, tmp_path / "b.nii.gz")

    def det(volume, index, score):
        return {"label": 1, "name": "lesion", "center_mm": volume.index_to_physical(index)[0].tolist(), "score": score}

    (tmp_path / "a.json").write_text(json.dumps([
        det(va, [3, 3, 2], 0.9), det(va, [4, 4, 3], 0.8),  # two hits on A1: the second is no false positive
        det(va, [15, 15, 5], 0.7),  # false positive
        det(va, [22.2, 21.8, 6.1], 0.3),  # A2 (rounded to the nearest voxel)
    ]), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"detections": [
        det(vb, [0, 29, 9], 0.95),  # false positive
        det(vb, [11, 12, 4], 0.6),  # B1
        det(vb, [27, 2, 1], 0.5),  # on unannotated voxels: left out
    ]}), encoding="utf-8")
    result = froc_from_files([tmp_path / "a.json", tmp_path / "b.json"], [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    # pooled by score: .95 FP (0.5 FP/scan) | .9 A1 1/3 | .8 A1 again | .7 FP (1 FP/scan) | .6 B1 2/3 | .3 A2 3/3
    assert result["froc"] == pytest.approx({"0.5": 1 / 3, "1": 1.0, "2": 1.0, "4": 1.0, "8": 1.0})
    assert result["mean_sensitivity"] == pytest.approx((1 / 3 + 4) / 5)
    assert (result["lesions"], result["scans"], result["false_positives"], result["detections_ignored"]) == (3, 2, 2, 1)
    out, fig = tmp_path / "froc.json", tmp_path / "froc.png"
    assert main(["evaluate", "--detections", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--truth", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"),
                 "--lesion-label", "1", "--json", str(out), "--figure", str(fig)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["froc"]["0.5"] == pytest.approx(1 / 3)
    assert fig.read_bytes().startswith(PNG)


# --- classification AUC --------------------------------------------------------------------------

def test_auc_on_hand_made_cases(tmp_path):
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert roc_auc([0, 1, 1], [0.5, 0.5, 0.9]) == pytest.approx(0.75)  # a tie counts one half
    rng = np.random.default_rng(1)
    truth, scores = rng.integers(0, 2, 40), rng.random(40)
    import torch
    from monai.metrics import compute_roc_auc

    assert roc_auc(truth, scores) == pytest.approx(float(compute_roc_auc(torch.tensor(scores), torch.tensor(truth))))
    multi = classification_metrics(["a", "b", "c"], [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]], ["a", "b", "c"])
    assert multi["per_class"]["a"]["auc"] == pytest.approx(1.0) and multi["auc"] == pytest.approx(1.0)

    (tmp_path / "r.csv").write_text("image,truth,score\ncase1,0,0.1\ncase2,0,0.4\ncase3,1,0.35\ncase4,1,0.8\n", encoding="utf-8")
    out, fig = tmp_path / "auc.json", tmp_path / "roc.png"
    assert main(["evaluate", "--classification", str(tmp_path / "r.csv"), "--json", str(out), "--figure", str(fig)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["auc"] == pytest.approx(0.75) and (result["positives"], result["negatives"]) == (2, 2)
    assert fig.read_bytes().startswith(PNG)


# --- slice interpolation baseline ----------------------------------------------------------------

def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return (sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2).astype(np.uint8)


def test_interpolation_fills_a_sphere_between_two_annotated_slices():
    sphere = _ball((32, 32, 21), (15.5, 16.2, 10.0), 9.0)
    sparse = np.full(sphere.shape, 255, np.uint8)
    for k in (5, 15):
        sparse[..., k] = sphere[..., k]
    filled = interpolate_between_slices(sparse, axis=2)
    assert filled.dtype == np.uint8 and not (filled == 255).any()
    assert np.array_equal(filled[..., 5], sphere[..., 5]) and np.array_equal(filled[..., 15], sphere[..., 15])
    assert all(filled[..., k].sum() > 0 for k in range(6, 15))
    assert filled[..., :5].sum() == 0 and filled[..., 16:].sum() == 0  # no extrapolation
    dice = segmentation_metrics(filled[..., 5:16], sphere[..., 5:16], None)["mean_dice"]
    assert dice > 0.85  # a cylinder inside a sphere: what two slices can tell
    sparse[..., 10] = sphere[..., 10]
    dice3 = segmentation_metrics(interpolate_between_slices(sparse)[..., 5:16], sphere[..., 5:16], None)["mean_dice"]
    assert dice3 > 0.95


def test_interpolation_of_two_classes_along_another_axis_with_taper():
    a = _ball((24, 20, 20), (12.0, 6.0, 6.0), 4.5)
    sparse = np.full((24, 20, 20), 255, np.uint8)
    sparse[4] = 0
    sparse[4][a[12] > 0] = 1  # class 1: the same disc on slices 4 and 12 (axis 0)
    sparse[12] = sparse[4]
    sparse[12][12:18, 12:18] = 2  # class 2 only on slice 12; slice 20 is annotated without it
    sparse[20] = 0
    filled = interpolate_between_slices(sparse, axis=0, spacing=(3.0, 1.0, 1.0))
    assert all(np.array_equal(filled[k] == 1, a[12] > 0) for k in range(4, 13))  # a cylinder
    area2 = [(filled[k] == 2).sum() for k in range(12, 21)]
    assert area2[0] == 36 and area2[-1] == 0 and all(x >= y for x, y in zip(area2, area2[1:]))  # tapers off
    assert filled[:4].sum() == 0 and filled[21:].sum() == 0
