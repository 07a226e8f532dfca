"""The cohort model (MedSSL.tasks.cohort): paintings completed by the few-shot engine, the CPU working grid,
the correction of a draft with a plane or two, and ``medssl predict`` on many scans in one call."""

import csv
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from MedSSL.data.phantom import make_phantom
from MedSSL.errors import MedSSLError
from MedSSL.io.bundle import read_meta
from MedSSL.io.volumes import read_volume, write_volume
from MedSSL.tasks import FinetuneConfig
from MedSSL.tasks.cohort.completion import PaintingCompleter, complete_painting
from MedSSL.tasks.cohort.components import DROP_SHARE
from MedSSL.tasks.cohort.correction import correct_draft, correction_painting, worst_planes
from MedSSL.tasks.cohort.grid import class_diameters_mm, working_spacing
from MedSSL.tasks.cohort.train import (DEFAULT_STEPS, DEFAULT_WIDTH, MAX_DEFAULT_STEPS, cohort_config, default_steps,
                                      painted_diameters_mm)

SIZE = {"shape": (48, 48, 24), "spacing": (4.0, 4.0, 6.0)}
LIVER = 1


def liver_case(seed):
    """A phantom CT and its liver label (1), the other organs background."""
    phantom = make_phantom(seed, **SIZE)
    truth = (phantom.labels.array == LIVER).astype(np.uint8)
    return phantom.image, truth


def painted(truth, planes, axis=2):
    out = np.full(truth.shape, 255, np.uint8)
    index = [slice(None)] * 3
    index[axis] = list(planes)
    out[tuple(index)] = truth[tuple(index)]
    return out


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def liver_planes(truth, k):
    z = np.flatnonzero(truth.any(axis=(0, 1)))
    return np.round(np.linspace(z[0], z[-1], k + 2)[1:-1]).astype(int).tolist()


def test_completion_keeps_painted_planes_and_leaves_doubtful_voxels_out():
    image, truth = liver_case(0)
    planes = liver_planes(truth, 3)
    paint = painted(truth, planes)
    label, info = complete_painting(image.array, image.spacing, paint, confidence=0.9)
    assert info["planes"] == 3
    # the painted planes are copied exactly; the rest is completed (dense) except the doubtful voxels
    assert np.array_equal(label[..., planes], truth[..., planes])
    assert 0 < info["ignored_fraction"] < 0.2
    assert np.count_nonzero(label == 255) == pytest.approx(info["ignored_fraction"] * label.size, abs=1)
    # what is kept is the liver: better than the painted planes alone would give (their share of the liver)
    kept = label != 255
    assert dice(label[kept] == 1, truth[kept] == 1) > 0.9
    everything, info0 = complete_painting(image.array, image.spacing, paint, confidence=0.0)
    assert info0["ignored_fraction"] == 0 and not np.any(everything == 255)


def test_completer_passes_dense_labels_and_one_slice_images_unchanged():
    image, truth = liver_case(0)
    completer = PaintingCompleter(0.7)
    assert completer(image, truth, 0) is truth
    flat = np.full((8, 8, 1), 255, np.uint8)
    flat[2:4] = 1
    assert completer(image, flat, 1) is flat
    assert [r["label"] for r in completer.records] == ["dense", "dense"] and completer.completed == 0


def test_working_spacing_coarsens_fine_scans_but_keeps_small_structures_and_the_slice_axis():
    la = working_spacing([(0.625,) * 3], [(200, 145, 88)], [45.0])
    assert la is not None and la[0] == la[1] == la[2] and 1.0 < la[0] <= 1.6  # atrium-like: about 2x coarser
    assert working_spacing([(0.625,) * 3], [(200, 145, 88)], [8.0]) is None  # an 8 mm structure keeps the grid
    chaos = working_spacing([(1.25, 1.25, 7.7)], [(256, 256, 35)], [60.0])
    assert chaos is not None and chaos[2] == 7.7 and chaos[0] == chaos[1] > 1.25
    assert working_spacing([(4.0, 4.0, 6.0)], [(48, 48, 24)], [60.0]) is None  # small scans stay as they are


def test_diameters_from_dense_labels_and_from_paintings():
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[5:15, 5:15, 5:15] = 1  # 1000 voxels of 1 mm3: a 12.4 mm sphere
    assert class_diameters_mm(truth, (1, 1, 1)) == pytest.approx([12.407], abs=0.01)
    paint = painted(truth, [10])
    assert painted_diameters_mm(paint, (1, 1, 1)) == pytest.approx([2 * np.sqrt(100 / np.pi)])


def test_cohort_config_fills_in_width_and_grid_and_leaves_given_values(tmp_path):
    image, truth = liver_case(0)
    fine = image.with_array(image.array)
    fine.spacing = np.array([0.6, 0.6, 0.6])
    label = fine.with_array(truth)
    write_volume(fine, tmp_path / "img.nii.gz")
    write_volume(label, tmp_path / "lab.nii.gz")
    # 48 x 48 x 24 voxels: below the voxel budget, so the grid stays; the width is the CPU default
    config, record = cohort_config(FinetuneConfig(out=tmp_path / "m", images=[tmp_path / "img.nii.gz"],
                                                  labels=[tmp_path / "lab.nii.gz"]))
    assert config.width == DEFAULT_WIDTH and config.spacing is None and "working_spacing_mm" not in record
    given, record = cohort_config(FinetuneConfig(out=tmp_path / "m", images=[tmp_path / "img.nii.gz"],
                                                 labels=[tmp_path / "lab.nii.gz"], width=4, spacing=(1.0, 1.0, 1.0)))
    assert given.width == 4 and given.spacing == (1.0, 1.0, 1.0) and record == {"position": "off (default)"}
    assert config.position == given.position == "off"
    # no --steps / --max-time: the cohort default, recorded and logged
    lines = []
    chosen, record = cohort_config(FinetuneConfig(out=tmp_path / "m", images=[tmp_path / "img.nii.gz"],
                                                  labels=[tmp_path / "lab.nii.gz"]), lines.append, budget_given=False)
    assert chosen.loop.steps == DEFAULT_STEPS != FinetuneConfig(out=".").loop.steps
    assert record["steps"].startswith(f"{DEFAULT_STEPS} (") and any(line.startswith(f"{DEFAULT_STEPS} optimiser steps") for line in lines)
    # several classes: more steps (each class centred in as many patches as one class gets), capped
    two = label.with_array(np.where(truth > 0, 1 + (np.indices(truth.shape)[0] > truth.shape[0] // 2), 0).astype(np.uint8))
    write_volume(two, tmp_path / "two.nii.gz")
    chosen, record = cohort_config(FinetuneConfig(out=tmp_path / "m", images=[tmp_path / "img.nii.gz"],
                                                  labels=[tmp_path / "two.nii.gz"]), budget_given=False)
    assert chosen.loop.steps == DEFAULT_STEPS * 3 // 2 and "2 classes" in record["steps"]
    assert default_steps(None, 4)[0] == default_steps(None, 3)[0] == MAX_DEFAULT_STEPS < DEFAULT_STEPS * 5 // 2


def test_correction_with_every_draft_plane_redoes_only_the_planes_near_the_corrected_one():
    """``draft_planes=None`` (the first design): the draft on every plane beyond the gap, kept as it was."""
    image, truth = liver_case(1)
    z = np.flatnonzero(truth.any(axis=(0, 1)))
    draft = truth.copy()
    wrong = int(z[len(z) // 2])
    draft[..., wrong - 1:wrong + 2] = 0  # the network missed the liver on three planes
    assert worst_planes(draft, truth, 2, 1)[0] in (wrong - 1, wrong, wrong + 1)
    fix = painted(truth, [wrong])
    painting = correction_painting(draft, fix, 2, image.spacing, gap_mm=12.0, draft_planes=None)
    near = [k for k in range(truth.shape[2]) if abs(k - wrong) * 6.0 < 12.0]
    assert np.all(painting[..., [k for k in near if k != wrong]] == 255)
    assert np.array_equal(painting[..., wrong], truth[..., wrong])
    far = [k for k in range(truth.shape[2]) if k not in near]
    assert np.array_equal(painting[..., far], draft[..., far])
    fixed = correct_draft(image.array, image.spacing, draft, fix, gap_mm=12.0, draft_planes=None)
    assert np.array_equal(fixed[..., far], draft[..., far])  # nothing changes away from the correction
    assert np.array_equal(fixed[..., wrong], truth[..., wrong])
    # the planes next to the corrected one, empty in the draft, get the liver back
    for k in (wrong - 1, wrong + 1):
        assert dice(fixed[..., k] == 1, truth[..., k] == 1) > 0.8
    assert dice(fixed == 1, truth == 1) > dice(draft == 1, truth == 1)


def test_correction_reaches_every_plane_from_a_few_draft_planes():
    """The default: the engine is given the corrected plane and DRAFT_PLANES planes of the draft spread over
    its extent (none within the gap), and redoes the whole scan with the appearance learned on them, so a
    plane the draft got wrong far from the correction is fixed too (the first design leaves it as it was)."""
    from MedSSL.data.painted_planes import spread_planes
    from MedSSL.tasks.cohort.correction import DRAFT_PLANES

    image, truth = liver_case(1)
    z = np.flatnonzero(truth.any(axis=(0, 1)))
    draft = truth.copy()
    wrong = int(z[len(z) // 2])
    draft[..., wrong - 1:wrong + 2] = 0  # the network missed the liver on three planes ...
    spread = [k for k in spread_planes(draft, 2, DRAFT_PLANES) if abs(k - wrong) * 6.0 >= 12.0]
    hole = next(int(k) for k in z[1:-1] if abs(k - wrong) * 6.0 >= 12.0 and k not in spread)
    draft[..., hole] = 0  # ... and on one more, far from the plane the user corrects
    fix = painted(truth, [wrong])
    painting = correction_painting(draft, fix, 2, image.spacing, gap_mm=12.0)
    given = [k for k in range(truth.shape[2]) if np.all(painting[..., k] != 255)]
    assert given == sorted(spread + [wrong]) and 0 < len(spread) <= DRAFT_PLANES
    assert np.array_equal(painting[..., spread], draft[..., spread])
    fixed = correct_draft(image.array, image.spacing, draft, fix, gap_mm=12.0)
    local = correct_draft(image.array, image.spacing, draft, fix, gap_mm=12.0, draft_planes=None)
    assert np.array_equal(fixed[..., wrong], truth[..., wrong])
    assert not local[..., hole].any() and dice(fixed[..., hole] == 1, truth[..., hole] == 1) > 0.8
    assert dice(fixed == 1, truth == 1) > dice(local == 1, truth == 1) > dice(draft == 1, truth == 1)


def test_a_correction_may_erase_what_the_draft_found():
    """A corrected plane holding background only (the draft found structure where there is none) is a
    correction too: that plane becomes background, in both designs."""
    image, truth = liver_case(1)
    z = np.flatnonzero(truth.any(axis=(0, 1)))
    draft = truth.copy()
    beyond = int(z[-1]) + 2
    draft[..., beyond] = truth[..., int(z[-1])]  # a false plane past the liver's end
    fix = np.full(truth.shape, 255, np.uint8)
    fix[..., beyond] = 0
    for draft_planes in (5, None):
        fixed = correct_draft(image.array, image.spacing, draft, fix, gap_mm=12.0, draft_planes=draft_planes)
        assert not np.any(fixed[..., beyond])
        assert dice(fixed == 1, truth == 1) > 0.95


def test_the_networks_probabilities_carry_a_correction_where_the_image_cannot():
    """``prior``: the draft's class probabilities join the engine's features (as log-odds). On an image of
    noise (no appearance to learn) a cylinder runs 4 planes past the first and last draft planes: with the
    network's probabilities the engine ends it where the network does; from the planes alone it tapers it."""
    from scipy import ndimage

    from MedSSL.data.painted_planes import spread_planes
    from MedSSL.tasks.cohort.correction import DRAFT_PLANES, prior_features
    from MedSSL.tasks.fewshot.frame import prepare_frame

    shape, spacing = (40, 40, 30), (2.0, 2.0, 2.0)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    truth = ((((x - 18) ** 2 + (y - 20) ** 2) <= 49) & (z >= 3) & (z <= 26)).astype(np.uint8)
    draft_planes = spread_planes(truth, 2, DRAFT_PLANES)
    ends = np.zeros(shape, bool)
    ends[..., :draft_planes[0]] = ends[..., draft_planes[-1] + 1:] = True
    assert truth[ends].sum() > 0.1 * truth.sum()
    image = np.random.default_rng(0).normal(0.0, 1.0, shape).astype(np.float32)
    prior = np.clip(ndimage.gaussian_filter(truth.astype(np.float32), 1.0), 0.02, 0.98)[None]  # the network: right
    fix = painted(truth, [draft_planes[len(draft_planes) // 2]])
    alone = correct_draft(image, spacing, truth, fix)
    guided = correct_draft(image, spacing, truth, fix, prior=prior)
    assert dice(guided[ends] == 1, truth[ends] == 1) > 0.9 > dice(alone[ends] == 1, truth[ends] == 1) + 0.1
    assert dice(guided == 1, truth == 1) > 0.95
    # the log-odds are clipped and the frame takes them as extra feature channels of the image's shape
    odds = prior_features(np.array([[[[0.0, 0.5, 1.0]]]]))
    assert odds.shape == (1, 1, 1, 3) and abs(float(odds[0, 0, 0, 1])) < 1e-3 and 6.5 < float(odds[0, 0, 0, 2]) < 7.0
    paint = painted(truth, draft_planes)
    plain, _, _ = prepare_frame(image, spacing, paint, 10.0)
    extended, _, _ = prepare_frame(image, spacing, paint, 10.0, extra_features=prior_features(prior))
    assert extended.features.shape[0] == plain.features.shape[0] + 1
    with pytest.raises(MedSSLError, match="extra features"):
        prepare_frame(image, spacing, paint, 10.0, extra_features=prior_features(prior)[:, :-1])


def test_refine_draft_redoes_a_draft_from_its_own_planes():
    """The no-touch refinement measured in docs/cohort.md (and not used by predict): the engine redoes the scan
    from DRAFT_PLANES planes of the draft, which it keeps exactly; an empty draft comes back as it was."""
    from MedSSL.data.painted_planes import spread_planes
    from MedSSL.tasks.cohort.correction import DRAFT_PLANES, refine_draft

    image, truth = liver_case(1)
    draft = truth.copy()
    planes = spread_planes(truth, 2, DRAFT_PLANES)
    hole = next(int(k) for k in np.flatnonzero(truth.any(axis=(0, 1)))[1:-1] if k not in planes)
    draft[..., hole] = 0  # a plane the draft missed, not one of those the engine is given
    assert spread_planes(draft, 2, DRAFT_PLANES) == planes
    refined = refine_draft(image.array, image.spacing, draft, axis=2)
    assert np.array_equal(refined[..., planes], draft[..., planes])
    assert dice(refined[..., hole] == 1, truth[..., hole] == 1) > 0.8 and dice(refined == 1, truth == 1) > 0.9
    empty = np.zeros_like(truth)
    assert np.array_equal(refine_draft(image.array, image.spacing, empty), empty)


def _medssl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "MedSSL", *map(str, args), "--device", "cpu", "--progress", "none"],
                          capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def cohort_model(tmp_path_factory):
    """A tiny cohort model from two painted phantom scans (3 planes each)."""
    folder = tmp_path_factory.mktemp("cohort")
    args = []
    for seed in (0, 1):
        image, truth = liver_case(seed)
        write_volume(image, folder / f"scan{seed}.nii.gz")
        write_volume(image.with_array(painted(truth, liver_planes(truth, 3))), folder / f"paint{seed}.nii.gz")
        args += ["--image", folder / f"scan{seed}.nii.gz", "--label", folder / f"paint{seed}.nii.gz"]
    result = _medssl("finetune", *args, "--classes", "1=liver", "--width", 4, "--steps", 6, "--patch", 32, 32, 16,
                     "--out", folder / "model")
    assert result.returncode == 0, result.stderr
    return folder


def test_finetune_on_painted_scans_trains_on_completed_labels(cohort_model):
    meta = read_meta(cohort_model / "model")
    completion = meta["cohort"]["completion"]
    assert completion["engine"] == "few-shot" and completion["confidence"] == FinetuneConfig(out=".").completion_confidence
    assert [s["label"] for s in completion["scans"]] == ["painting completed by the few-shot engine"] * 2
    assert all(s["planes"] == 3 for s in completion["scans"])
    # the network trained on dense (completed) labels: whole-volume windows, no painted-axis sampling
    assert meta["fewshot"]["annotation"] == "dense"
    assert "/" not in json.dumps(meta["cohort"])  # no paths in the bundle
    # the completed livers are one piece: predictions lose the liver's small stray pieces
    assert meta["cohort"]["postprocess"] == {"one_piece_classes": [1], "drop_pieces_below": DROP_SHARE}


def test_a_refresh_without_a_budget_trains_a_quarter_of_the_previous_models_steps(cohort_model, tmp_path):
    chosen, record = cohort_config(FinetuneConfig(out=tmp_path / "m", images=[cohort_model / "scan0.nii.gz"],
                                                  labels=[cohort_model / "paint0.nii.gz"], init=str(cohort_model / "model")),
                                   budget_given=False)
    assert chosen.loop.steps == 2 and "0.25 of the 6 steps" in record["steps"]  # round(6 / 4)


def test_paintings_are_never_tilted(tmp_path):
    """An out-of-plane rotation (``augment_tilt_deg``) would smear painted planes into their unpainted
    neighbours: asked for on a painting trained without completion, it is left out."""
    from MedSSL.engine.loop import LoopConfig
    from MedSSL.engine.progress import Progress
    from MedSSL.tasks.finetune.segment import finetune_segmentation

    image, truth = liver_case(0)
    write_volume(image, tmp_path / "scan.nii.gz")
    write_volume(image.with_array(painted(truth, liver_planes(truth, 3))), tmp_path / "paint.nii.gz")
    config = FinetuneConfig(out=tmp_path / "m", images=[tmp_path / "scan.nii.gz"], labels=[tmp_path / "paint.nii.gz"],
                            width=4, patch=(32, 32, 16), device="cpu", complete_paintings=False, augment_tilt_deg=15.0,
                            loop=LoopConfig(steps=1))
    meta = read_meta(finetune_segmentation(config, Progress("none")))
    assert meta["fewshot"]["annotation"] == "slices" and meta["fewshot"]["augmentation"]["tilt_deg"] == 0.0
    dense = replace(config, out=tmp_path / "d", labels=[tmp_path / "truth.nii.gz"])
    write_volume(image.with_array(truth), tmp_path / "truth.nii.gz")
    assert read_meta(finetune_segmentation(dense, Progress("none")))["fewshot"]["augmentation"]["tilt_deg"] == 15.0


def test_one_piece_classes_from_the_training_labels():
    from MedSSL.tasks.cohort.components import ComponentSurvey, one_piece_classes

    labels = np.zeros((20, 20, 10), np.uint8)
    labels[2:8, 2:8, 2:8] = 1            # one piece
    labels[12:18, 2:8, 2:8] = 2          # two pieces of equal size
    labels[12:18, 12:18, 2:8] = 2
    labels[2:8, 12:18, 2:8] = 3          # one piece and a speck (under 10 %)
    labels[0, 19, 0] = 3
    labels[10, 10, 9] = 255              # not annotated: ignored
    assert one_piece_classes(labels) == {1: True, 2: False, 3: True}
    survey = ComponentSurvey()
    survey.add(labels)
    other = labels.copy()
    other[2:8, 2:8, 9] = 1               # class 1 in two pieces in another scan (216 + 36 voxels)
    survey.add(other)
    assert survey.record == {"one_piece_classes": [3], "drop_pieces_below": DROP_SHARE}


def test_small_pieces_are_dropped_and_comparable_ones_kept():
    """The clean-up removes pieces under the share of the largest; a piece nearly as large stays (the largest
    one is not always the right one)."""
    from MedSSL.tasks.infer.postprocess import drop_small_pieces

    labels = np.zeros((30, 30, 10), np.uint8)
    labels[0:10, 0:10, 0:5] = 1        # 500 voxels
    labels[20:28, 0:10, 0:5] = 1       # 400: kept at 0.2
    labels[0:3, 20:23, 0:3] = 1        # 27: dropped
    labels[20:23, 20:23, 0:3] = 2      # another class: untouched
    labels[25:26, 25:26, 5:6] = 2
    out = drop_small_pieces(labels, [1], 0.2)
    assert (out == 1).sum() == 900 and not out[0:3, 20:23, 0:3].any()
    assert np.array_equal(out == 2, labels == 2)
    assert (drop_small_pieces(labels, [1], 1.0) == 1).sum() == 500


def test_predict_drops_small_pieces_of_a_one_piece_class_unless_asked_not_to(cohort_model, tmp_path):
    """The cohort model's clean-up (model.json cohort.postprocess) runs by default; --all-components keeps
    what the network found; both options together are refused."""
    from MedSSL.tasks.infer.postprocess import drop_small_pieces

    image, truth = liver_case(3)
    write_volume(image, tmp_path / "new.nii.gz")
    outs = {}
    for name, extra in (("default", []), ("all", ["--all-components"])):
        result = _medssl("predict", "--model", cohort_model / "model", "--image", tmp_path / "new.nii.gz",
                         "--out", tmp_path / f"{name}.nii.gz", *extra)
        assert result.returncode == 0, result.stderr
        outs[name] = read_volume(tmp_path / f"{name}.nii.gz").array
    assert (outs["all"] == 1).any()
    assert np.array_equal(outs["default"], drop_small_pieces(outs["all"], [1], DROP_SHARE))
    both = _medssl("predict", "--model", cohort_model / "model", "--image", tmp_path / "new.nii.gz",
                   "--out", tmp_path / "x.nii.gz", "--all-components", "--largest-component")
    assert both.returncode == 2 and "--all-components" in both.stderr and not (tmp_path / "x.nii.gz").exists()


def test_predict_many_scans_into_a_folder_with_a_summary(cohort_model, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for seed in (2, 3):
        write_volume(liver_case(seed)[0], scans / f"new{seed}.nii.gz")
    result = _medssl("predict", "--model", cohort_model / "model", "--image", scans, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open(encoding="utf-8")))
    assert [r["image"] for r in rows] == ["new2.nii.gz", "new3.nii.gz"]
    assert [r["labels"] for r in rows] == ["new2.nii.gz", "new3.nii.gz"]
    for row in rows:
        labels = read_volume(tmp_path / "out" / row["labels"]).array
        assert int(row["liver voxels"]) == int((labels == 1).sum())
        assert float(row["liver mL"]) == pytest.approx((labels == 1).sum() * 4 * 4 * 6 / 1000, abs=1e-3)


def test_predict_many_reports_a_bad_scan_and_segments_the_others(cohort_model, tmp_path):
    good = tmp_path / "good.nii.gz"
    write_volume(liver_case(2)[0], good)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    result = _medssl("predict", "--model", cohort_model / "model", "--image", good, bad, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("medssl: error: --image: 1 of 2 scan(s) failed")
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open(encoding="utf-8")))
    assert rows[0]["error"] == "" and (tmp_path / "out" / "good.nii.gz").is_file()
    assert "bad.nii.gz" in rows[1]["error"] and not (tmp_path / "out" / "bad.nii.gz").exists()


def test_predict_many_refuses_per_file_options_and_a_file_as_out(cohort_model, tmp_path):
    write_volume(liver_case(2)[0], tmp_path / "a.nii.gz")
    write_volume(liver_case(3)[0], tmp_path / "b.nii.gz")
    images = ["--image", tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    result = _medssl("predict", "--model", cohort_model / "model", *images, "--out", tmp_path / "x.nii.gz")
    assert result.returncode == 2 and "--out" in result.stderr and "folder" in result.stderr
    result = _medssl("predict", "--model", cohort_model / "model", *images, "--out", tmp_path / "o",
                     "--probabilities", tmp_path / "p.nii.gz")
    assert result.returncode == 2 and "--probabilities" in result.stderr
    assert not (tmp_path / "o").exists()


def test_predict_with_corrected_planes_keeps_them_and_improves_the_draft(cohort_model, tmp_path):
    image, truth = liver_case(2)
    write_volume(image, tmp_path / "new.nii.gz")
    draft_run = _medssl("predict", "--model", cohort_model / "model", "--image", tmp_path / "new.nii.gz",
                        "--out", tmp_path / "draft.nii.gz")
    assert draft_run.returncode == 0, draft_run.stderr
    draft = read_volume(tmp_path / "draft.nii.gz").array
    plane = worst_planes(draft, truth, 2, 1)[0]
    write_volume(image.with_array(painted(truth, [plane])), tmp_path / "fix.nii.gz")
    result = _medssl("predict", "--model", cohort_model / "model", "--image", tmp_path / "new.nii.gz",
                     "--annotation", tmp_path / "fix.nii.gz", "--out", tmp_path / "fixed.nii.gz")
    assert result.returncode == 0, result.stderr
    fixed = read_volume(tmp_path / "fixed.nii.gz").array
    assert np.array_equal(fixed[..., plane], truth[..., plane])
    assert dice(fixed == 1, truth == 1) > dice(draft == 1, truth == 1)


def test_predict_corrects_with_the_drafts_class_probabilities(cohort_model, tmp_path, monkeypatch):
    """``predict --annotation`` hands the engine the draft's class probabilities on the scan's grid (the
    ``prior`` of :func:`correct_draft`), one map per foreground class, high where the draft found the class."""
    import torch

    from MedSSL.engine.progress import Progress
    from MedSSL.tasks.cohort import correction
    from MedSSL.tasks.infer import PredictOptions
    from MedSSL.tasks.infer.model import load_model

    image, truth = liver_case(2)
    write_volume(image, tmp_path / "new.nii.gz")
    write_volume(image.with_array(painted(truth, liver_planes(truth, 1))), tmp_path / "fix.nii.gz")
    seen = {}

    def spy(image_array, spacing, draft, corrected, **kwargs):
        seen.update(draft=draft, prior=kwargs.get("prior"))
        return correct_draft(image_array, spacing, draft, corrected, **kwargs)

    monkeypatch.setattr(correction, "correct_draft", spy)
    model = load_model(cohort_model / "model", torch.device("cpu"))
    correction.predict_corrected(model, tmp_path / "new.nii.gz", tmp_path / "fix.nii.gz", tmp_path / "fixed.nii.gz",
                                 PredictOptions(), Progress("none"))
    prior = seen["prior"].astype(np.float32)
    assert prior.shape == (1,) + truth.shape and 0.0 <= prior.min() and prior.max() <= 1.0
    found = seen["draft"] == 1
    assert found.any() and prior[0][found].mean() > 0.5 > prior[0][~found].mean()
    assert (tmp_path / "fixed.nii.gz").is_file()


@pytest.fixture(scope="module")
def self_trained(cohort_model):
    """Self-training: the two painted phantoms plus one unlabelled phantom (and a painted scan given again as
    unlabelled, which is skipped)."""
    unlabeled = cohort_model / "unlabeled"
    unlabeled.mkdir(exist_ok=True)
    write_volume(liver_case(2)[0], unlabeled / "scan2.nii.gz")
    args = []
    for seed in (0, 1):
        args += ["--image", cohort_model / f"scan{seed}.nii.gz", "--label", cohort_model / f"paint{seed}.nii.gz"]
    result = _medssl("finetune", *args, "--unlabeled", unlabeled, cohort_model / "scan0.nii.gz", "--classes",
                     "1=liver", "--width", 4, "--steps", 8, "--patch", 32, 32, 16, "--out", cohort_model / "self")
    assert result.returncode == 0, result.stderr
    return cohort_model / "self"


def test_self_training_adds_pseudo_labelled_scans_in_a_second_round(self_trained):
    meta = read_meta(self_trained)
    record = meta["cohort"]["self_training"]
    assert record["unlabeled_scans"] == 1 and record["round1"] == {"steps": 8, "init": {"source": "scratch"}}
    assert record["round2_steps"] == 4 and meta["training"]["steps"] == 4
    assert 0.0 < record["kept_fraction"][0] <= 1.0
    assert meta["data_summary"]["volumes"] == 3 and meta["architecture"]["width"] == 4
    assert [s["label"] for s in meta["cohort"]["completion"]["scans"]] == (
        ["painting completed by the few-shot engine"] * 2 + ["pseudo-label (self-training)"])
    assert record["pseudo_weight"] == 1.0  # 1 pseudo-labelled scan beside 2 labelled ones: not weighed down
    assert "/" not in json.dumps(meta["cohort"])  # no paths in the bundle
    # a refresh of a self-trained model counts the steps of both rounds: round(0.25 x 12)
    chosen, _ = cohort_config(FinetuneConfig(out=self_trained.parent / "refresh", images=[self_trained.parent / "scan0.nii.gz"],
                                             labels=[self_trained.parent / "paint0.nii.gz"], init=str(self_trained)),
                              budget_given=False)
    assert chosen.loop.steps == 3


def test_unlabelled_scans_are_files_folders_and_dicom_series_less_the_labelled_ones(tmp_path):
    import SimpleITK as sitk

    from MedSSL.tasks.cohort.self_training import unlabeled_scans

    image, _ = liver_case(0)
    folder = tmp_path / "cohort"
    (folder / "series").mkdir(parents=True)
    write_volume(image, folder / "a.nii.gz")
    write_volume(image, folder / "labelled.nii.gz")
    series = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))
    for k in range(3):  # a DICOM series folder of 3 slices: taken as one scan, read when it is segmented
        plane = series[:, :, k]
        for tag, value in {"0020|000e": "1.2.3.4", "0020|0013": str(k + 1), "0020|0032": f"0\\0\\{k}",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0060": "CT"}.items():
            plane.SetMetaData(tag, value)
        sitk.WriteImage(plane, str(folder / "series" / f"{k}.dcm"))
    logged = []
    config = FinetuneConfig(out=tmp_path / "m", images=[folder / "labelled.nii.gz"], labels=[folder / "labelled.nii.gz"],
                            unlabeled=[folder])
    assert unlabeled_scans(config, logged.append) == [folder / "a.nii.gz", folder / "series"]
    assert logged == ["1 --unlabeled scan(s) skipped: they are also --image"]


def test_pseudo_labelled_scans_give_at_most_half_the_patches():
    from MedSSL.tasks.cohort.self_training import PSEUDO_SHARE, sample_weights

    assert PSEUDO_SHARE == 0.5
    assert sample_weights(4, 12) == [1.0] * 4 + [pytest.approx(1 / 3)] * 12  # 4 x 1 against 12 x 1/3
    assert sample_weights(4, 4) == [1.0] * 8 and sample_weights(4, 2) == [1.0] * 6


def test_pseudo_labels_keep_only_confident_voxels(cohort_model, tmp_path, monkeypatch):
    from MedSSL.engine.progress import Progress
    from MedSSL.tasks.cohort import self_training

    image, _ = liver_case(2)
    write_volume(image, tmp_path / "scan.nii.gz")
    result = _medssl("predict", "--model", cohort_model / "model", "--image", tmp_path / "scan.nii.gz",
                     "--out", tmp_path / "draft.nii.gz", "--probabilities", tmp_path / "p.nii.gz")
    assert result.returncode == 0, result.stderr
    draft = read_volume(tmp_path / "draft.nii.gz").array
    monkeypatch.setattr(self_training, "PSEUDO_CONFIDENCE", 0.0)
    (everything,), (kept,) = self_training.pseudo_labels(cohort_model / "model", [tmp_path / "scan.nii.gz"],
                                                         tmp_path / "all", "cpu", Progress("none"))
    assert kept == 1.0 and np.array_equal(read_volume(everything).array, draft)  # the draft, as predict gives it
    monkeypatch.setattr(self_training, "PSEUDO_CONFIDENCE", 1.01)
    (nothing,), (kept,) = self_training.pseudo_labels(cohort_model / "model", [tmp_path / "scan.nii.gz"],
                                                      tmp_path / "none", "cpu", Progress("none"))
    assert kept == 0.0 and np.all(read_volume(nothing).array == 255)


@pytest.mark.parametrize("case", ["missing", "only-labelled", "one-slice", "resume", "classify", "out-in-use"])
def test_self_training_refuses_bad_input_before_writing(cohort_model, tmp_path, case):
    pairs = ["--image", cohort_model / "scan0.nii.gz", "--label", cohort_model / "paint0.nii.gz"]
    unlabeled, extra = [tmp_path / "nowhere.nii.gz"], []
    if case == "only-labelled":
        unlabeled = [cohort_model / "scan0.nii.gz"]
    if case == "one-slice":
        image, _ = liver_case(2)
        write_volume(replace(image, array=image.array[..., :1]), tmp_path / "slice.nii.gz")
        unlabeled = [tmp_path / "slice.nii.gz"]
    if case in ("resume", "classify"):
        unlabeled = [cohort_model / "scan1.nii.gz"]
        extra = ["--resume"] if case == "resume" else ["--task", "classify"]
        pairs = pairs if case == "resume" else ["--csv", tmp_path / "table.csv"]
    out = tmp_path / "out"
    if case == "out-in-use":  # an --out holding another run is refused before round 1, not after it
        unlabeled, out = [cohort_model / "scan1.nii.gz"], tmp_path / "busy"
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"")
    result = _medssl("finetune", *pairs, "--unlabeled", *unlabeled, *extra, "--steps", 2, "--out", out)
    expected = {"missing": "nowhere.nii.gz: no such file", "only-labelled": "every scan given is also an --image",
                "one-slice": "a one-slice image", "resume": "--resume cannot continue",
                "classify": "self-training is for the network", "out-in-use": "busy: already holds a training run"}[case]
    assert result.returncode != 0 and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.glob("busy/*")) in ([], ["checkpoint.pt"])
