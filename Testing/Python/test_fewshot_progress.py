"""Issue 19 (what a clinician sees): the few-shot engine reports its phases - features, fit, calibration while
fine-tuning and apply while predicting - as stages, with progress steps, so Slicer's progress bar moves."""

from __future__ import annotations

import json

from MedSSL.commands.cli import main
from MedSSL.io.volumes import write_volume
from finetune_helpers import volume
from test_fewshot import SPACING, ellipsoid_case, paint


def _events(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_fewshot_phases_are_reported(tmp_path, capsys):
    image, truth = ellipsoid_case()
    grid = volume(image, spacing=SPACING)
    write_volume(grid, tmp_path / "img.nii.gz")
    write_volume(grid.with_array(paint(truth, 2, [8, 16])), tmp_path / "painted.nii.gz")
    assert main(["finetune", "--image", str(tmp_path / "img.nii.gz"), "--label", str(tmp_path / "painted.nii.gz"),
                 "--out", str(tmp_path / "m"), "--device", "cpu", "--progress", "json", "--steps", "20"]) == 0
    events = _events(capsys)
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages[-3:] == ["features", "fit", "calibration"]
    steps = [(e["stage"], e["step"], e["total"]) for e in events if e["event"] == "progress"]
    assert steps == [("features", 0, 3), ("fit", 1, 3), ("calibration", 2, 3), ("calibration", 3, 3)]
    assert main(["predict", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "img.nii.gz"), "--annotation",
                 str(tmp_path / "painted.nii.gz"), "--out", str(tmp_path / "p.nii.gz"), "--device", "cpu",
                 "--progress", "json"]) == 0
    events = _events(capsys)
    assert "apply" in [e["stage"] for e in events if e["event"] == "stage"]
    assert [(e["step"], e["total"]) for e in events if e["event"] == "progress" and e["stage"] == "apply"] == [(0, 1), (1, 1)]


def test_a_few_shot_model_of_another_image_is_refused_as_init(tmp_path, capsys):
    """Issue 19 item 1, backend side: --init with a few-shot model fitted on an image of another size is a
    one-line error (exit status 2), not a correction round of another patient's model."""
    image, truth = ellipsoid_case()
    grid = volume(image, spacing=SPACING)
    write_volume(grid, tmp_path / "a.nii.gz")
    write_volume(grid.with_array(paint(truth, 2, [8, 16])), tmp_path / "a-painted.nii.gz")
    assert main(["finetune", "--image", str(tmp_path / "a.nii.gz"), "--label", str(tmp_path / "a-painted.nii.gz"),
                 "--out", str(tmp_path / "a-model"), "--device", "cpu", "--progress", "none", "--steps", "20"]) == 0
    other, other_truth = ellipsoid_case(shape_=(40, 48, 24), seed=1)
    grid = volume(other, spacing=SPACING)
    write_volume(grid, tmp_path / "b.nii.gz")
    write_volume(grid.with_array(paint(other_truth, 2, [8, 16])), tmp_path / "b-painted.nii.gz")
    capsys.readouterr()
    status = main(["finetune", "--image", str(tmp_path / "b.nii.gz"), "--label", str(tmp_path / "b-painted.nii.gz"),
                   "--init", str(tmp_path / "a-model"), "--out", str(tmp_path / "b-model"), "--device", "cpu",
                   "--progress", "none", "--steps", "20"])
    assert status == 2 and not (tmp_path / "b-model").exists()
    assert "a few-shot model of an image of size [48, 48, 24], not [40, 48, 24]" in capsys.readouterr().err
