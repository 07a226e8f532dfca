"""MedSSLSegmentLogic end to end in blocking mode against the stand-in backend (fake_medssl.py): the nodes
it makes (names, colors, geometry, RAS control points), failures, cancel. Segment and detect against the real
backend are in MedSSLTrainer/Testing/Python/test_trainer_backend.py (test_finetune_segment_detect_suggest)."""

import json
import os
import time

import numpy as np
import pytest

from slicer_testing_helpers import addVolume, phantom

CLASSES = {"1": {"name": "tissue", "color": [0.2, 0.8, 0.2]}, "2": {"name": "lesion", "color": [0.9, 0.1, 0.1]}}


def bundle(tmp_path, task, classes=CLASSES, **extra):
    path = tmp_path / f"{task}-bundle"
    path.mkdir(exist_ok=True)
    meta = {"format": "medssl-bundle", "format_version": 1, "architecture": {"name": "fake"}, "task": task,
            "classes": classes, **extra}
    (path / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    return str(path)


@pytest.fixture
def logic(scene, fake_backend):
    from MedSSLSegmentLib.logic import MedSSLSegmentLogic

    return MedSSLSegmentLogic()


def test_segment(logic, scene, tmp_path):
    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    segmentation = logic.segment(volume, bundle(tmp_path, "segment"))
    assert segmentation.IsA("vtkMRMLSegmentationNode") and segmentation.GetName() == "ct segment-bundle"
    seg = segmentation.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(2)] == ["tissue", "lesion"]
    np.testing.assert_allclose(seg.GetNthSegment(1).GetColor(), [0.9, 0.1, 0.1])
    labels, _info = nodes.segmentsLabelmap(segmentation, volume)
    expected = np.where(phantom() > 100, 2, np.where(phantom() > 0, 1, 0))
    assert np.array_equal(labels, expected)  # voxel for voxel on the oblique, non-isotropic grid
    job = logic.lastJob
    assert job.status == "done" and not os.path.exists(os.path.join(job.jobDir, "inputs"))


def test_detect_gives_ras_control_points_and_table(logic, scene, tmp_path):
    from MedSSLCommonLib import geometry, nodes

    volume = addVolume(scene, phantom(), name="ct")
    logic.minVolumeMm3 = 0.0  # the phantom's lesion is 13 mm^3
    markups = logic.detect(volume, bundle(tmp_path, "segment", detection=True))
    assert markups.IsA("vtkMRMLMarkupsFiducialNode") and markups.GetNumberOfControlPoints() == 2
    assert markups.GetNthControlPointLabel(0) == "lesion 0.90" and markups.GetNthControlPointLabel(1) == "tissue 0.60"
    k, j, i = np.nonzero(phantom() > 100)
    expected = geometry.indexToRas(nodes.ijkToRasArray(volume), [i.mean(), j.mean(), k.mean()])
    position = [0.0, 0.0, 0.0]
    markups.GetNthControlPointPosition(0, position)
    np.testing.assert_allclose(position, expected, atol=1e-6)
    table = markups.GetNodeReference("MedSSLFindings")
    assert table is logic.lastOutputs["table"] and table.GetNumberOfRows() == 2
    np.testing.assert_allclose([table.GetTable().GetValue(0, c).ToDouble() for c in (3, 4, 5)], expected, atol=1e-6)


def test_detections_are_a_handful_of_ranked_findings(logic, scene, tmp_path, monkeypatch):
    """Issue 11 item 12: a detector that returns 300 components gives at most maxFindings points (score >=
    minScore, volume >= minVolumeMm3), best first, each labelled with its score; the table lists every
    finding when asked, marking the shown ones."""
    monkeypatch.setenv("FAKE_MEDSSL_FINDINGS", "300")
    volume = addVolume(scene, phantom(), name="ct")
    model = bundle(tmp_path, "segment", detection=True)
    markups = logic.detect(volume, model)
    count = markups.GetNumberOfControlPoints()
    labels = [markups.GetNthControlPointLabel(i) for i in range(count)]
    scores = [float(label.rsplit(" ", 1)[1]) for label in labels]
    assert count == logic.maxFindings == 10 and scores == sorted(scores, reverse=True) and min(scores) >= 0.5
    assert labels[0] == "tissue 0.95" and all(label.startswith("tissue 0.") for label in labels)
    assert logic.lastOutputs["table"].GetNumberOfRows() == 10 and logic.lastOutputs["findingsTotal"] == 302

    logic.maxFindings, logic.minScore, logic.allFindingsInTable = 3, 0.0, True
    markups = logic.detect(volume, model)
    table = logic.lastOutputs["table"]
    assert markups.GetNumberOfControlPoints() == 3 and table.GetNumberOfRows() == 302
    shownColumn = [int(table.GetTable().GetValue(r, 7).ToInt()) for r in range(table.GetNumberOfRows())]
    assert sum(shownColumn) == 3 and shownColumn[0] == 1  # rows best score first; small ones are not shown


def test_slicer_and_backend_detection_defaults_agree():
    from MedSSL.tasks.infer import detect
    from MedSSLCommonLib import nodes

    assert (nodes.DEFAULT_MIN_SCORE, nodes.DEFAULT_MIN_VOLUME_MM3, nodes.DEFAULT_MAX_FINDINGS) == (
        detect.DEFAULT_MIN_SCORE, detect.DEFAULT_MIN_VOLUME_MM3, detect.DEFAULT_MAX_FINDINGS)
    found = [{"score": s, "volume_mm3": v} for s, v in ((0.9, 100.0), (0.95, 5.0), (0.4, 500.0), (0.7, 30.0))]
    assert detect.select_findings(found) == nodes.selectFindings(found) == [found[0], found[3]]


def test_classify_and_apply_dispatch(logic, scene, tmp_path):
    volume = addVolume(scene, phantom(), name="ct")
    model = bundle(tmp_path, "classify", {"0": {"name": "normal"}, "1": {"name": "abnormal"}})
    table = logic.apply(volume, model)
    assert table.IsA("vtkMRMLTableNode") and table.GetCellText(0, 0) == "abnormal"
    with pytest.raises(ValueError, match="'classify' model"):
        logic.segment(volume, model)
    with pytest.raises(ValueError, match="cannot be applied"):
        logic.apply(volume, bundle(tmp_path, "pretrain", {}))


def test_failure_reason_and_scene_untouched(logic, scene, tmp_path, monkeypatch):
    from MedSSLCommonLib import jobs

    volume = addVolume(scene, phantom(), name="ct")
    count = scene.GetNumberOfNodes()
    monkeypatch.setenv("FAKE_MEDSSL_FAIL", "CUDA out of memory; try --device cpu")
    with pytest.raises(jobs.JobError, match="^CUDA out of memory; try --device cpu$"):
        logic.segment(volume, bundle(tmp_path, "segment"))
    assert scene.GetNumberOfNodes() == count
    assert "medssl: error: CUDA out of memory" in logic.lastJob.readLog()


def test_non_blocking_then_cancel_leaves_scene(logic, scene, tmp_path, monkeypatch):
    volume = addVolume(scene, phantom(), name="ct")
    count = scene.GetNumberOfNodes()
    monkeypatch.setenv("FAKE_MEDSSL_STEP_S", "0.5")
    job = logic.segment(volume, bundle(tmp_path, "segment"), blocking=False)
    assert job.running
    job.cancel()
    assert job.status == "cancelled" and scene.GetNumberOfNodes() == count
    # and a job that finishes while polled imports once, on the polling thread
    monkeypatch.delenv("FAKE_MEDSSL_STEP_S")
    job = logic.segment(volume, bundle(tmp_path, "segment"), blocking=False)
    deadline = time.monotonic() + 60
    while job.running and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.status == "done" and job.result.IsA("vtkMRMLSegmentationNode")


def test_job_folders_keep_no_patient_data(scene, fake_backend, tmp_path, monkeypatch):
    """Issue 11 item 9: input copies are deleted in every outcome; by default a job's folder goes once its
    results are in the scene, and only log.txt stays after a failure; keepJobFiles keeps outputs and logs;
    a job that cannot start leaves no folder."""
    from MedSSLCommonLib import jobs
    from MedSSLSegmentLib.logic import MedSSLSegmentLogic

    volume = addVolume(scene, phantom(), name="ct")
    model = bundle(tmp_path, "segment")
    logic = MedSSLSegmentLogic()
    logic.segment(volume, str(model))
    assert not os.path.exists(logic.lastJob.jobDir)

    logic.keepJobFiles = True
    logic.segment(volume, str(model))
    assert {"log.txt", "prediction.nrrd"} <= set(os.listdir(logic.lastJob.jobDir)) and "inputs" not in os.listdir(logic.lastJob.jobDir)

    logic.keepJobFiles = False
    monkeypatch.setenv("FAKE_MEDSSL_FAIL", "model broken")
    with pytest.raises(jobs.JobError, match="model broken"):
        logic.segment(volume, str(model))
    monkeypatch.delenv("FAKE_MEDSSL_FAIL")
    assert os.listdir(logic.lastJob.jobDir) == ["log.txt"]  # for the error message; the scan copy is gone

    jobsFolder = tmp_path / "work" / "jobs"
    before = sorted(os.listdir(jobsFolder))
    logic.python = str(tmp_path / "no-such-python")
    with pytest.raises(jobs.JobError, match="cannot start"):
        logic.segment(volume, str(model))
    assert sorted(os.listdir(jobsFolder)) == before


def test_few_shot_bundle_is_refused_with_a_reason(logic, scene, tmp_path):
    volume = addVolume(scene, phantom(), name="ct")
    with pytest.raises(ValueError, match="completes the painting it was trained with"):
        logic.apply(volume, bundle(tmp_path, "fewshot"))
