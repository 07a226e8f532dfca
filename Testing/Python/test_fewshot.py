"""The few-shot engine (MedSSL/tasks/fewshot): painted planes on any axis, its pieces, the CLI and a correction round.

Synthetic cases only (the real suite is Testing/Benchmarks/bench_fewshot.py). Baselines quoted in the
thresholds were measured on these very volumes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from MedSSL.commands.cli import main
from MedSSL.errors import MedSSLError
from MedSSL.tasks.evaluate import interpolate_between_slices
from MedSSL.tasks.fewshot import appearance, shape
from MedSSL.tasks.fewshot.engine import FewShotSettings, segment_painted
from MedSSL.tasks.fewshot.fusion import radius_trend, walk
from MedSSL.data.painted_planes import find_painted_planes, is_painting
from MedSSL.io.volumes import read_volume, write_volume
from finetune_helpers import volume

SPACING = np.array([1.5, 1.5, 3.0])


def ellipsoid_case(shape_=(48, 48, 24), seed=0, contrast=120.0):
    """A bright ellipsoid (radii 12, 9, 7 voxels; 3 mm slices: it spans 15 slices) in noisy tissue, plus
    a bright decoy blob far from it that the painting never touches. Returns (image, truth)."""
    rng = np.random.default_rng(seed)
    g = np.indices(shape_, dtype=np.float64)
    truth = (((g[0] - 22) / 12) ** 2 + ((g[1] - 24) / 9) ** 2 + ((g[2] - 12) / 7) ** 2 <= 1).astype(np.uint8)
    decoy = ((g[0] - 42) ** 2 + (g[1] - 8) ** 2 + (g[2] - 12) ** 2) <= 9
    image = 40 + rng.normal(0, 15, shape_) + contrast * (truth | decoy)
    return image.astype(np.float32), truth


def paint(truth, axis, planes):
    sparse = np.full(truth.shape, 255, np.uint8)
    index = [slice(None)] * 3
    index[axis] = list(planes)
    sparse[tuple(index)] = truth[tuple(index)]
    return sparse


def dice_off(pred, truth, axis, planes):
    keep = np.ones(truth.shape[axis], bool)
    keep[list(planes)] = False
    p, t = np.compress(keep, pred > 0, axis=axis), np.compress(keep, truth > 0, axis=axis)
    return 2.0 * (p & t).sum() / (p.sum() + t.sum())


# ------------------------------------------------------------------------------------------------ planes

def test_painted_planes_are_found_on_any_axis_and_on_several_at_once():
    _, truth = ellipsoid_case()
    sparse = paint(truth, 2, [8, 12])
    sparse[20] = truth[20]  # and one sagittal plane (axis i)
    planes = find_painted_planes(sparse)
    assert planes.planes == ((20,), (), (8, 12)) and planes.main_axis == 2
    assert planes.describe() == "k=8,12; i=20"
    assert find_painted_planes(paint(truth, 0, [15, 22, 29])).planes == ((15, 22, 29), (), ())
    assert is_painting(sparse) and not is_painting(truth) and not is_painting(np.full(truth.shape, 255, np.uint8))


def test_a_label_without_a_painted_plane_or_without_structure_is_refused():
    _, truth = ellipsoid_case()
    scribble = np.full(truth.shape, 255, np.uint8)
    scribble[20:24, 20:24, 12] = 1  # a scribble, not a plane
    with pytest.raises(MedSSLError, match="no painted plane"):
        find_painted_planes(scribble)
    with pytest.raises(MedSSLError, match="only background"):
        find_painted_planes(paint(np.zeros_like(truth), 2, [5]))


# ------------------------------------------------------------------------------------------------ shape

def test_blend_of_two_discs_is_the_disc_of_the_blended_radius():
    g = np.indices((41, 41))
    disc = lambda r: ((g[0] - 20) ** 2 + (g[1] - 20) ** 2) <= r * r  # noqa: E731
    d0, d1 = shape.class_distances(disc(4), [True], (1, 1)), shape.class_distances(disc(12), [True], (1, 1))
    middle = shape.blend(d0, d1, 0.5)[0] < 0
    assert abs(middle.sum() - disc(8).sum()) < 0.08 * disc(8).sum()
    # a class absent on one side tapers: half-way it is about half as deep
    gone = shape.blend(d1, np.full_like(d1, shape.FAR), 0.5)[0] < 0
    assert 0.15 * disc(12).sum() < gone.sum() < 0.45 * disc(12).sum()


def test_carry_shrinks_and_keep_overlapping_drops_jumps():
    prev = np.zeros((30, 30), np.uint8)
    prev[10:20, 10:20] = 1
    d = shape.carry(prev, [1], (1.0, 1.0), 2.0)[0]
    assert (d < 0).sum() == 36  # 10x10 square shrunk by 2 on every side
    labels = prev.copy()
    labels[25:28, 25:28] = 1  # a component that does not touch the previous slice
    kept = shape.keep_overlapping(labels, prev, [1])
    assert kept[26, 26] == 0 and kept[15, 15] == 1


def test_radius_trend_of_a_sphere_ends_where_the_sphere_does():
    _, truth = ellipsoid_case()
    from MedSSL.tasks.fewshot.frame import Frame

    planes = [8, 12, 16]
    sparse = paint(truth, 2, planes)
    frame = Frame(sparse, sparse != 255, np.zeros((1,) + truth.shape, np.float32), SPACING, planes, ())
    fit = radius_trend(frame, [1], planes)[0]
    ends = sorted(np.roots(fit.coeffs).real / SPACING[2])
    assert ends[0] == pytest.approx(5.0, abs=1.5) and ends[1] == pytest.approx(19.0, abs=1.5)  # truth: 5..19


# ------------------------------------------------------------------------------------------- appearance

def test_appearance_log_odds_separate_the_bright_structure():
    image, truth = ellipsoid_case()
    feats = appearance.voxel_features(appearance.normalise(image), SPACING)
    assert feats.shape == (10,) + image.shape and feats.dtype == np.float32
    known = np.zeros(truth.shape, bool)
    known[..., [8, 16]] = True
    net = appearance.train_appearance(feats, truth, known, [1], SPACING, steps=150, seed=0)
    odds = appearance.log_odds(net, feats)[0]
    hidden = np.s_[..., 12]  # a plane it was not trained on
    inside, outside = odds[hidden][truth[hidden] > 0], odds[hidden][truth[hidden] == 0]
    assert np.median(inside) > 2 and np.median(outside) < -2


# ------------------------------------------------------------------------------------------------ engine

@pytest.mark.parametrize("axis,planes", [(2, [8, 12, 16]), (0, [16, 22, 28])])
def test_engine_beats_interpolation_on_axial_and_sagittal_paintings(axis, planes):
    """Baseline: interpolation from the same planes scores 0.50-0.70 here (nothing past the end planes);
    the engine must reach 0.85 and beat it by 0.1, whichever axis was painted."""
    image, truth = ellipsoid_case()
    sparse = paint(truth, axis, planes)
    model, result = segment_painted(image, SPACING, sparse, FewShotSettings(steps=150))
    baseline = dice_off(interpolate_between_slices(sparse, axis=axis, spacing=SPACING), truth, axis, planes)
    score = dice_off(result.labels, truth, axis, planes)
    assert score >= 0.85 and score >= baseline + 0.10, (score, baseline)
    assert result.labels[42, 8, 12] == 0  # the bright decoy is not connected to the painting
    assert result.planes.main_axis == axis


def test_engine_uses_planes_painted_on_two_axes():
    """Two axial planes and one sagittal plane: the sagittal one must count (its voxels stay as painted,
    and the result is at least as good as from the two axial planes alone)."""
    image, truth = ellipsoid_case()
    sparse = paint(truth, 2, [9, 15])
    alone = segment_painted(image, SPACING, sparse, FewShotSettings(steps=150))[1].labels
    sparse[22] = truth[22]
    both = segment_painted(image, SPACING, sparse, FewShotSettings(steps=150))[1].labels
    assert np.array_equal(both[22], truth[22])
    hidden = np.ones(truth.shape, bool)
    hidden[..., [9, 15]] = False
    hidden[22] = False

    def dice(p):
        return 2 * ((p > 0) & (truth > 0) & hidden).sum() / (((p > 0) & hidden).sum() + ((truth > 0) & hidden).sum())

    assert dice(both) >= dice(alone) - 0.01 and dice(both) > 0.85


def test_calibration_turns_appearance_down_when_the_image_shows_nothing():
    """No contrast at all: the leave-one-plane-out calibration must not trust the appearance (weight <= 0.5)
    and the engine then stays close to interpolation between the planes; with contrast it trusts it (>= 1)."""
    image, truth = ellipsoid_case(contrast=0.0)
    sparse = paint(truth, 2, [6, 9, 12, 15, 18])
    model, _ = segment_painted(image, SPACING, sparse, FewShotSettings(steps=150))
    assert model.weight <= 0.5 and model.calibration
    image, _ = ellipsoid_case(contrast=120.0)
    model, _ = segment_painted(image, SPACING, sparse, FewShotSettings(steps=150))
    assert model.weight >= 1.0


def test_engine_is_stable_across_seeds():
    image, truth = ellipsoid_case()
    sparse = paint(truth, 2, [8, 12, 16])
    scores = [dice_off(segment_painted(image, SPACING, sparse, FewShotSettings(steps=150, seed=s))[1].labels,
                       truth, 2, [8, 12, 16]) for s in range(3)]
    assert np.std(scores) <= 0.01


# --------------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def painted_files(tmp_path):
    image, truth = ellipsoid_case()
    grid = volume(image, spacing=SPACING)
    write_volume(grid, tmp_path / "img.nii.gz")
    write_volume(grid.with_array(paint(truth, 2, [8, 16])), tmp_path / "round1.nii.gz")
    write_volume(grid.with_array(paint(truth, 2, [8, 12, 16])), tmp_path / "round2.nii.gz")
    write_volume(grid.with_array(truth), tmp_path / "truth.nii.gz")
    return tmp_path


def _finetune(files, label, out, *extra):
    return main(["finetune", "--image", str(files / "img.nii.gz"), "--label", str(files / label), "--out", str(out),
                 "--classes", "1=organ", "--device", "cpu", "--progress", "none", "--steps", "150", *extra])


def _predict(files, model, label, out, *extra):
    return main(["predict", "--model", str(model), "--image", str(files / "img.nii.gz"), "--annotation",
                 str(files / label), "--out", str(out), "--device", "cpu", "--progress", "none", *extra])


def test_cli_finetune_predict_suggest_and_a_correction_round(painted_files, capsys):
    f = painted_files
    assert _finetune(f, "round1.nii.gz", f / "m1") == 0
    meta = json.loads((f / "m1" / "model.json").read_text(encoding="utf-8"))
    assert meta["task"] == "fewshot" and meta["classes"]["1"]["name"] == "organ"
    assert meta["fewshot"]["painted_planes"]["k"] == [8, 16]
    assert _predict(f, f / "m1", "round1.nii.gz", f / "p1.nii.gz", "--probabilities", str(f / "prob.nii.gz"),
                    "--detections", str(f / "det.json")) == 0
    truth = read_volume(f / "truth.nii.gz").array
    pred1 = read_volume(f / "p1.nii.gz").array
    assert dice_off(pred1, truth, 2, [8, 16]) > 0.85
    findings = json.loads((f / "det.json").read_text(encoding="utf-8"))
    assert len(findings) == 1 and findings[0]["name"] == "organ"
    assert _predict(f, f / "m1", "round1.nii.gz", f / "p0.nii.gz", "--detections", str(f / "none.json"),
                    "--min-score", "1.01") == 0
    assert json.loads((f / "none.json").read_text(encoding="utf-8")) == []
    prob = read_volume(f / "prob.nii.gz").array
    assert prob[truth > 0].mean() > 0.8 and prob[(truth == 0)].mean() < 0.1
    capsys.readouterr()
    assert main(["suggest", "--device", "cpu", "--model", str(f / "m1"), "--image", str(f / "img.nii.gz"), "--label",
                 str(f / "round1.nii.gz"), "--count", "3"]) == 0
    slices = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["slices"]
    assert len(slices) == 3 and not {s["index"] for s in slices} & {8, 16} and {s["axis"] for s in slices} == {2}
    # round 2: one more plane painted, starting from round 1's model (a quarter of the steps)
    assert _finetune(f, "round2.nii.gz", f / "m2", "--init", str(f / "m1"), "--progress", "json") == 0
    out = capsys.readouterr().out
    assert "correction round" in out
    meta2 = json.loads((f / "m2" / "model.json").read_text(encoding="utf-8"))
    assert meta2["init"]["fewshot_round"] is True and meta2["fewshot"]["painted_planes"]["k"] == [8, 12, 16]
    assert _predict(f, f / "m2", "round2.nii.gz", f / "p2.nii.gz") == 0
    assert dice_off(read_volume(f / "p2.nii.gz").array, truth, 2, [8, 12, 16]) > 0.85


def test_correction_round_starts_from_the_previous_model(painted_files):
    """With zero new steps a warm start must return round 1's MLP unchanged (a cold start would not)."""
    from MedSSL.tasks.fewshot.bundle import load_fewshot_bundle

    f = painted_files
    assert _finetune(f, "round1.nii.gz", f / "m1") == 0
    image, sparse = read_volume(f / "img.nii.gz"), read_volume(f / "round2.nii.gz").array
    previous, _ = load_fewshot_bundle(f / "m1")
    model, _ = segment_painted(image.array, image.spacing, sparse, FewShotSettings(steps=0), previous=previous)
    for key, value in previous.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_predict_with_a_fewshot_model_needs_the_painting(painted_files, capsys):
    f = painted_files
    assert _finetune(f, "round1.nii.gz", f / "m1") == 0
    capsys.readouterr()
    status = main(["predict", "--device", "cpu", "--model", str(f / "m1"), "--image", str(f / "img.nii.gz"), "--out", str(f / "p.nii.gz"),
                   "--progress", "none"])
    assert status == 2 and "--annotation" in capsys.readouterr().err
    assert not (f / "p.nii.gz").exists()


def test_engine_choice_dense_labels_keep_the_network_and_fewshot_refuses_them(painted_files, capsys):
    f = painted_files
    capsys.readouterr()
    status = main(["finetune", "--device", "cpu", "--image", str(f / "img.nii.gz"), "--label", str(f / "truth.nii.gz"), "--out",
                   str(f / "m"), "--engine", "fewshot", "--progress", "none"])
    assert status == 2 and "not a painting" in capsys.readouterr().err and not (f / "m").exists()


def test_fewshot_with_a_pretrained_network_adds_its_decoder_features(painted_files, tmp_path):
    """--init of a U-Net (here an official-format .pt) joins its decoder features (2 x width) to the
    hand-made ones, and predict rebuilds them from the bundle."""
    from medssl_testing import official_checkpoint

    f = painted_files
    official_checkpoint(tmp_path / "genesis.pt", width=4)
    assert _finetune(f, "round1.nii.gz", f / "m", "--init", str(tmp_path / "genesis.pt")) == 0
    meta = json.loads((f / "m" / "model.json").read_text(encoding="utf-8"))
    assert meta["architecture"]["features"] == 10 + 8 and meta["architecture"]["backbone_width"] == 4
    assert _predict(f, f / "m", "round1.nii.gz", f / "p.nii.gz") == 0
    assert dice_off(read_volume(f / "p.nii.gz").array, read_volume(f / "truth.nii.gz").array, 2, [8, 16]) > 0.8


def test_a_detector_on_a_painting_is_a_network(painted_files):
    """--detection asks for a model applied to other scans (no painting there): auto picks the network."""
    f = painted_files
    assert _finetune(f, "round1.nii.gz", f / "det", "--detection", "--steps", "2", "--width", "4",
                     "--patch", "16", "16", "8") == 0
    meta = json.loads((f / "det" / "model.json").read_text(encoding="utf-8"))
    assert meta["task"] == "segment" and meta["detection"] is True


# ---------------------------------------------------------------------------------------------- benchmarks

def _bench(name, argv, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "Benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[name] = module  # its child processes unpickle functions by module name
    spec.loader.exec_module(module)
    assert module.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_fewshot_quick_smoke(tmp_path, capsys):
    """The README's few-shot table cannot lose the code that made it (skips itself without ../shared/data)."""
    out = _bench("bench_fewshot", ["--quick", "--out", str(tmp_path)], capsys)
    if "skipped" in out:
        pytest.skip(out["skipped"])
    cell = out["table"]["cord_t2w/k3"]
    assert cell["engine"]["mean"] > cell["interpolation"]["mean"] + 0.05 and (tmp_path / "dice_vs_k.png").is_file()


def test_bench_fewshot_large_quick_smoke(tmp_path, capsys):
    """The large benchmark's table (docs/benchmarks/fewshot-large.md) cannot lose the code that made it."""
    out = _bench("bench_fewshot_large", ["--quick", "--out", str(tmp_path)], capsys)
    if "skipped" in out:
        pytest.skip(out["skipped"])
    cell = out["per_painting"]["main:3"]
    assert out["instances"] == 2 and cell["n"] == 2 and cell["fraction_below_interpolation"] == 0.0
    assert cell["engine_mean"] > cell["interpolation_mean"] + 0.1 and (tmp_path / "dice_vs_size_contrast.png").is_file()
    assert len((tmp_path / "runs.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_bench_fewshot_speed_quick_smoke(capsys):
    out = _bench("bench_fewshot_speed", ["--quick"], capsys)
    if "skipped" in out:
        pytest.skip(out["skipped"])
    row = out["rows"][0]
    assert row["round1"]["dice"] > 0.8 and row["round2"]["dice"] > 0.8 and row["round2"]["total_s"] > 0


def test_walks_take_the_size_trend_from_the_slice_they_leave():
    """Both walks past the painted range shrink the carried shape from the slice just left: the first step
    down from plane 5 goes 5 -> 4 (a bug once took it from 3), the first step up 5 -> 6."""
    start = np.zeros((12, 12), np.uint8)
    start[3:9, 3:9] = 1
    calls = []

    def shrink(k_from, k_to):
        calls.append((k_from, k_to))
        return np.zeros(1, np.float32)

    odds = lambda k: np.zeros((1, 12, 12), np.float32)  # noqa: E731  (no appearance evidence either way)
    for slices, expected in ((range(4, 1, -1), [(5, 4), (4, 3), (3, 2)]), (range(6, 9), [(5, 6), (6, 7), (7, 8)])):
        calls.clear()
        walk(start, 5, slices, odds, 1.0, shrink, [1], (1.0, 1.0), 1.0)
        assert calls == expected


# ------------------------------------------------------------------------------------------ runaway walk

def lesion_case(seed=0):
    """A heterogeneous lesion (bright rim, core a little brighter than the tissue) shaped as a dumbbell: a
    small lobe, a narrow waist, a large lobe; it ends at slice 18 of 28 (3 mm slices), and from slice 19
    on, the tissue is mottled with the lesion's own intensities. Returns (image, truth)."""
    from scipy import ndimage

    shape_ = (48, 48, 28)
    rng = np.random.default_rng(seed)
    x, y, z = np.indices(shape_, dtype=np.float64) * np.array([1.0, 1.0, 3.0])[:, None, None, None]
    r2 = (x - 24) ** 2 + (y - 24) ** 2
    truth = (r2 + (z - 24) ** 2 <= 49) | (r2 + (z - 45) ** 2 <= 81) | ((r2 <= 9) & (z >= 24) & (z <= 45))
    rim = truth & ~ndimage.binary_erosion(truth, iterations=2)
    image = 60 + rng.normal(0, 25, shape_) + 90 * rim + 30 * (truth & ~rim)
    mottled = ndimage.gaussian_filter(rng.normal(0, 1, shape_), 1.0) > 0.3
    image += (z >= 57) * np.where(mottled, 90, 30)
    return image.astype(np.float32), truth.astype(np.uint8)


def test_the_walk_does_not_run_away_into_tissue_that_looks_like_the_lesion():
    """Painted on 9, 12, 17 (areas 129 / 29 / 145 voxels), the lesion ends at 18 with one voxel and the
    tissue past it has the lesion's intensities. The walk used to grow from 1 to over 1,000 voxels a
    slice for 7 slices (Dice 0.34, below interpolation's 0.46). Leave-one-plane-out scores this painting
    poorly (best 0.33), so now the walk stays inside the carried shape and stops at the lesion's end."""
    image, truth = lesion_case()
    planes = [9, 12, 17]
    sparse = paint(truth, 2, planes)
    _, result = segment_painted(image, np.array([1.0, 1.0, 3.0]), sparse, FewShotSettings())
    inter = interpolate_between_slices(sparse, axis=2, spacing=np.array([1.0, 1.0, 3.0]))
    assert (result.labels[..., 19:] > 0).sum() <= 10
    assert dice_off(result.labels, truth, 2, planes) > dice_off(inter, truth, 2, planes) + 0.3


def test_the_walk_grows_only_on_strong_evidence_and_not_at_all_when_the_model_is_poor():
    """A walk from a 6 x 6 square into a slice whose appearance says 'structure' everywhere: with
    moderate evidence (log-odds 1) it stays inside the carried shape, with strong evidence (8) it grows
    by at most WALK_GROWTH mm per mm a slice, with grow=False (a poor model) not at all, and unguarded
    (one painted plane) the appearance and the fading prior decide, and it grows further."""
    from MedSSL.tasks.fewshot.calibration import walk_may_grow
    from MedSSL.tasks.fewshot.fusion import WALK_GROWTH

    start = np.zeros((40, 40), np.uint8)
    start[17:23, 17:23] = 1
    shrink = lambda k_from, k_to: np.zeros(1, np.float32)  # noqa: E731
    areas = {}
    for name, level, grow, guarded in (("moderate", 1.0, True, True), ("strong", 8.0, True, True),
                                       ("poor", 8.0, False, True), ("one plane", 8.0, True, False)):
        odds = lambda k, level=level: np.full((1, 40, 40), level, np.float32)  # noqa: E731
        walked = walk(start, 0, range(1, 4), odds, 1.0, shrink, [1], (1.0, 1.0), 2.0, grow, guarded)
        areas[name] = [int(labels.sum()) for _, labels, _ in walked]
    assert areas["moderate"] == [36, 36, 36] and areas["poor"] == [36, 36, 36]
    side = [6 + 2 * int(WALK_GROWTH * 2.0 * s) for s in (1, 2, 3)]  # at most WALK_GROWTH x 2 mm more a side per slice
    assert areas["strong"][0] > 36 and all(a <= n * n for a, n in zip(areas["strong"], side))
    assert all(free > guarded for free, guarded in zip(areas["one plane"], areas["strong"]))
    assert walk_may_grow({}) and walk_may_grow({"0": 0.3, "1": 0.8}) and not walk_may_grow({"0": 0.24, "1": 0.25})


def test_the_blend_between_painted_planes_bulges_as_a_rounded_structure_does(monkeypatch):
    """Signed-distance blending interpolates the radius linearly and under-fills an ellipsoid between its
    painted planes; the local parabola of r^2 (:func:`bulge_fn`) grows the blend there. Shape only
    (weight 0), so the prior alone decides between the planes: off-plane Dice rises, fewer voxels missed."""
    from MedSSL.tasks.fewshot import fusion

    image, truth = ellipsoid_case()
    planes = [7, 12, 17]
    sparse = paint(truth, 2, planes)
    between = np.zeros(truth.shape[2], bool)
    between[8:17] = True
    between[planes] = False

    def score():
        labels = segment_painted(image, SPACING, sparse, FewShotSettings(weight=0.0, steps=50))[1].labels
        p, t = labels[..., between] > 0, truth[..., between] > 0
        return 2.0 * (p & t).sum() / (p.sum() + t.sum()), int((t & ~p).sum())

    with_bulge = score()
    monkeypatch.setattr(fusion, "BULGE_LIMIT", 0.0)
    without = score()
    assert with_bulge[0] > without[0] + 0.01 and with_bulge[1] < without[1]
