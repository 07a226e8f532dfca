"""Paths of the few-shot engine that test_fewshot.py does not reach: the coarse in-plane feature grid of
large regions, a coronal painting, what a correction round keeps, where the walk past the painted range
stops and how much it trusts the image, the clean-up of components that touch no painted voxel, no paths
in a few-shot bundle or its progress lines, and --engine auto under torchrun."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from MedSSL.errors import MedSSLError
from MedSSL.tasks.evaluate import interpolate_between_slices
from MedSSL.tasks.fewshot import engine as engine_module
from MedSSL.tasks.fewshot import frame as frame_module
from MedSSL.tasks.fewshot import fusion
from MedSSL.tasks.fewshot.engine import FewShotSettings, _clean, fit_painting, segment_painted
from MedSSL.tasks.fewshot.task import choose_engine
from test_fewshot import SPACING, _finetune, dice_off, ellipsoid_case, paint, painted_files  # noqa: F401


def _engine_against_interpolation(image, truth, axis, planes):
    sparse = paint(truth, axis, planes)
    _, result = segment_painted(image, SPACING, sparse, FewShotSettings(steps=150))
    baseline = dice_off(interpolate_between_slices(sparse, axis=axis, spacing=SPACING), truth, axis, planes)
    return dice_off(result.labels, truth, axis, planes), baseline, result


def test_a_coronal_painting_goes_through_the_engine():
    """Painted along axis 1 (coronal for an axis-aligned scan): the engine works in that frame and beats
    interpolation from the same planes (0.6-0.7 here, nothing past the end planes) by 0.1."""
    image, truth = ellipsoid_case()
    score, baseline, result = _engine_against_interpolation(image, truth, 1, [18, 24, 30])
    assert result.planes.main_axis == 1
    assert score >= 0.85 and score >= baseline + 0.10, (score, baseline)


def test_large_regions_get_their_features_on_a_coarse_in_plane_grid(monkeypatch):
    """The path every 512 x 512 figure depends on: a region over MAX_FEATURE_VOXELS gets its features every
    factor-th voxel in-plane and its log-odds interpolated back. Lowered to a third of the ellipsoid's
    region here, the region takes that path (factor 2) and still beats interpolation."""
    image, truth = ellipsoid_case()
    sparse = paint(truth, 2, [8, 12, 16])
    frame, _, _ = frame_module.prepare_frame(image, SPACING, sparse, FewShotSettings().margin_mm)
    assert frame.factor == 1
    monkeypatch.setattr(frame_module, "MAX_FEATURE_VOXELS", frame.labels.size // 3)
    frame, _, _ = frame_module.prepare_frame(image, SPACING, sparse, FewShotSettings().margin_mm)
    assert frame.factor == 2 and frame.features.shape[1] == -(-frame.labels.shape[0] // frame.factor)
    score, baseline, result = _engine_against_interpolation(image, truth, 2, [8, 12, 16])
    assert result.labels.shape == truth.shape
    assert score >= 0.85 and score >= baseline + 0.10, (score, baseline)


def _spy_on_training(monkeypatch) -> list:
    """Steps of every MLP training the engine runs, in order (the main fit, then calibration folds)."""
    steps, train = [], frame_module.Frame.train

    def spy(self, classes, known=None, **kwargs):
        steps.append(kwargs.get("steps"))
        return train(self, classes, known, **kwargs)

    monkeypatch.setattr(frame_module.Frame, "train", spy)
    return steps


def test_a_correction_round_keeps_the_calibrated_weight_and_trains_a_quarter_of_the_steps(monkeypatch):
    """Round 2 from round 1's model: the MLP starts from round 1's for steps // 4 and no leave-one-plane-out
    runs again; the weight stays the calibrated one (set here to 2.0, which a fresh calibration of this
    bright ellipsoid would not pick the same way every time). A cold start trains all steps and calibrates."""
    image, truth = ellipsoid_case()
    first = fit_painting(image, SPACING, paint(truth, 2, [8, 16]), FewShotSettings(steps=120))
    assert first.calibration
    first.weight, first.taper = 2.0, 0.7

    steps = _spy_on_training(monkeypatch)
    monkeypatch.setattr(engine_module, "choose_weight_and_taper",
                        lambda *a, **k: pytest.fail("a correction round calibrated again"))
    second = fit_painting(image, SPACING, paint(truth, 2, [8, 12, 16]), FewShotSettings(steps=120), previous=first)
    assert steps == [30] and (second.weight, second.taper) == (2.0, 0.7)


def test_a_cold_start_trains_every_step_and_calibrates(monkeypatch):
    image, truth = ellipsoid_case()
    steps = _spy_on_training(monkeypatch)
    model = fit_painting(image, SPACING, paint(truth, 2, [8, 12, 16]), FewShotSettings(steps=120))
    assert steps[0] == 120 and len(steps) > 1 and model.calibration  # folds of the leave-one-plane-out


def _disc(radius, size=32):
    g = np.indices((size, size))
    return ((g[0] - size // 2) ** 2 + (g[1] - size // 2) ** 2 <= radius ** 2).astype(np.uint8)


def test_the_walk_stops_at_the_first_empty_slice():
    """Slices 1-2 show the structure, slice 3 shows nothing, slices 4-9 show it again (another structure
    further on): the walk returns slices 1, 2 and the empty 3, and never reaches 4."""
    start = _disc(6)

    def odds(k):
        evidence = np.where(_disc(6) > 0, 8.0, -8.0) if k != 3 else np.full(start.shape, -8.0)
        return evidence[None].astype(np.float32)

    steps = fusion.walk(start, 0, range(1, 10), odds, 1.0, lambda a, b: np.zeros(1), [1], (1.0, 1.0), 1.0)
    assert [k for k, _, _ in steps] == [1, 2, 3]
    assert steps[0][1].any() and steps[1][1].any() and not steps[2][1].any()


def test_the_walk_reads_the_image_even_when_the_appearance_weight_is_zero(monkeypatch):
    """Past the painted range the image is the only evidence: compose hands the walk at least
    WALK_MIN_WEIGHT even for a volume whose calibrated weight is 0 (shape only between the planes)."""
    weights, walk = [], fusion.walk

    def spy(start, start_index, slices, odds, weight, *rest, **options):
        weights.append(weight)
        return walk(start, start_index, slices, odds, weight, *rest, **options)

    monkeypatch.setattr(fusion, "walk", spy)
    image, truth = ellipsoid_case()
    segment_painted(image, SPACING, paint(truth, 2, [9, 15]), FewShotSettings(steps=60, weight=0.0, taper=0.3))
    assert weights and min(weights) >= fusion.WALK_MIN_WEIGHT > 0


def test_the_clean_up_removes_components_that_touch_no_painted_voxel_of_their_class():
    """A decoy off the painted planes, touching no painted voxel, goes; so does a component that touches
    only another class's painted voxels; the structure connected to its painting stays, and painted
    voxels keep their painted values."""
    painted = np.full((20, 20, 12), 255, np.uint8)
    painted[..., 4] = 0
    painted[2:8, 2:8, 4] = 1
    painted[12:16, 12:16, 4] = 2
    labels = np.zeros(painted.shape, np.uint8)
    labels[2:8, 2:8, 2:9] = 1            # class 1, through its painting
    labels[14:18, 2:6, 7:11] = 1         # decoy: off the painted plane, touches nothing painted
    labels[12:16, 12:16, 5:8] = 1        # class 1 sitting on class 2's painting only
    labels[12:16, 12:16, 4] = 1          # (the painted plane itself says 2)
    out = _clean(labels, painted)
    assert (out[2:8, 2:8, 2:9] == 1).all()
    assert not out[14:18, 2:6, 7:11].any()
    assert not (out[12:16, 12:16, 5:8] == 1).any()
    assert (out[..., 4] == painted[..., 4]).all()


def test_a_fewshot_bundle_and_its_progress_lines_hold_no_paths(painted_files, tmp_path_factory, capsys):
    """The few-shot bundle names no path at all; the JSON progress lines of finetune and predict name no
    input (image, painting or their folder; the outputs the caller chose are reported back in ``done``,
    which the Slicer modules read)."""
    from test_fewshot import _predict

    f, out = painted_files, tmp_path_factory.mktemp("outputs")
    capsys.readouterr()
    assert _finetune(f, "round1.nii.gz", out / "m1", "--progress", "json") == 0
    assert _predict(f, out / "m1", "round1.nii.gz", out / "p.nii.gz", "--progress", "json") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert {json.loads(line)["event"] for line in lines} >= {"log", "done"}
    bundle = (out / "m1" / "model.json").read_text(encoding="utf-8")
    for needle in (str(f), "img.nii.gz", "round1.nii.gz"):
        assert not [line for line in lines if needle in line], needle
    for needle in (str(f), str(out), "img.nii.gz", "round1.nii.gz", "/tmp"):
        assert needle not in bundle, needle


def test_engine_auto_under_torchrun_falls_back_to_the_network(monkeypatch, tmp_path):
    """Under torchrun (WORLD_SIZE > 1) --engine auto trains the network, even on a painting; --engine
    fewshot is refused in one line. Alone, the same painting goes to the few-shot engine."""
    from MedSSL.io.volumes import write_volume
    from finetune_helpers import volume

    image, truth = ellipsoid_case()
    write_volume(volume(paint(truth, 2, [8, 16]), spacing=SPACING), tmp_path / "painted.nii.gz")
    config = SimpleNamespace(images=[tmp_path / "img.nii.gz"], labels=[tmp_path / "painted.nii.gz"], detection=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert choose_engine(config, "auto") == "fewshot"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert choose_engine(config, "auto") == "network"
    with pytest.raises(MedSSLError, match="without torchrun"):
        choose_engine(config, "fewshot")
