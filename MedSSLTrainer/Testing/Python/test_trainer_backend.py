"""Integration with the real MedSSL backend (torch on the CPU, seconds of training): a tiny few-shot
fine-tune from painted slices, then segment, detect and suggest through the logic classes in blocking mode.
Skipped when the backend CLI or torch is not available. The model is far too small to be good: the checks
are about the Slicer side (files, geometry, names, colors, RAS positions), not accuracy."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from MedSSLCommonLib import backend
from slicer_testing_helpers import bodyPhantom as phantom, obliqueMatrix


def backendAvailable():
    if backend.backendRoot() is None:
        return "MedSSL backend not found"
    try:
        help_ = subprocess.run([sys.executable, "-m", "MedSSL", "--help"], capture_output=True, text=True, timeout=120,
                               env=backend.childEnvironment(), cwd=tempfile.gettempdir()).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"MedSSL CLI does not run: {exc}"
    missing = [c for c in ("finetune", "predict", "suggest") if c not in help_]
    if missing:
        return f"MedSSL CLI lacks {', '.join(missing)}"
    if importlib.util.find_spec("torch") is None:  # looked up, not imported: no torch on the Slicer side
        return "torch not installed"
    return None


MARKER = "ZZPHIMARKER42"
REASON = backendAvailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def test_finetune_segment_detect_suggest(scene, real_backend, work_dir):
    from MedSSLCommonLib import geometry, nodes
    from MedSSLSegmentLib.logic import MedSSLSegmentLogic
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    array = phantom()
    matrix = obliqueMatrix(spacing=(1.1, 0.9, 2.5))
    # named as Slicer names a volume loaded from DICOM (series number, patient name): no file may carry it
    volume = nodes.addVolumeFromArray(array, matrix, f"2: {MARKER}^JANE ct", scene=scene)
    painted = np.zeros(array.shape, np.uint8)
    for k in (7, 9):
        painted[k][array[k] > 0] = 1
        painted[k][array[k] > 200] = 2
    classes = {"1": {"name": "body", "color": [0.9, 0.7, 0.6]}, "2": {"name": "lesion", "color": [1.0, 0.0, 0.0]}}
    annotation = nodes.segmentationFromLabelmap(painted, matrix, classes, volume, "painted")

    trainer = MedSSLTrainerLogic()
    trainer.device = "cpu"
    trainer.keepJobFiles = True  # the job folders (log.txt, inputs' NRRD copies removed, outputs) are checked below
    events = []
    bundle = trainer.finetune(volume, annotation, initModel="none", steps=2, width=8, detection=True,
                              onEvent=events.append)
    meta = json.loads(open(os.path.join(bundle, "model.json")).read())
    assert [meta["classes"][v]["name"] for v in ("1", "2")] == ["body", "lesion"] and meta.get("detection")
    assert any(e.get("event") == "progress" and e.get("stage") == "finetune" for e in events)

    # the fine-tune's prediction, cleaned up with the painting: painted voxels come back exactly, on the grid
    review = trainer.lastOutputs["segmentation"]
    segments = review.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())] == ["body", "lesion"]
    np.testing.assert_allclose(segments.GetNthSegment(1).GetColor(), [1.0, 0.0, 0.0])
    labels, _info = nodes.segmentsLabelmap(review, volume)
    assert np.array_equal(labels[painted > 0], painted[painted > 0])

    applier = MedSSLSegmentLogic()
    applier.device = "cpu"
    applier.keepJobFiles = True  # to compare the markups with the findings file
    applier.maxFindings, applier.minScore, applier.minVolumeMm3 = None, 0.0, 0.0  # every finding
    segmentation = applier.segment(volume, bundle)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume

    markups = applier.detect(volume, bundle)
    findings = json.loads(open(os.path.join(applier.lastJob.jobDir, "detections.json")).read())
    assert markups.GetNumberOfControlPoints() == len(findings) == applier.lastOutputs["table"].GetNumberOfRows()
    low, high = np.zeros(3) - 0.5, np.array(array.shape[::-1]) - 0.5
    rasToIjk = np.linalg.inv(nodes.ijkToRasArray(volume))
    for index, finding in enumerate(findings):
        position = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPosition(index, position)
        np.testing.assert_allclose(position, geometry.lpsToRas(finding["center_mm"]), atol=1e-6)
        ijk = rasToIjk[:3, :3] @ position + rasToIjk[:3, 3]
        assert np.all(ijk >= low) and np.all(ijk <= high)  # inside the volume
        assert markups.GetNthControlPointLabel(index) == f"{finding['name']} {finding['score']:.2f}"

    slices = trainer.suggestSlices(volume, bundle, count=3, segmentationNode=annotation)
    assert 1 <= len(slices) <= 3 and not {7, 9} & {s["index"] for s in slices if s["axis"] == 2}
    for item in slices:
        center = geometry.sliceCenterIndex(array.shape, item["axis"], item["index"])
        np.testing.assert_allclose(item["center_ras"], geometry.indexToRas(matrix, center), atol=1e-3)

    # PHI: the job folders (log.txt, prediction.nrrd headers, detections, the bundle) and the progress lines
    # hold no patient name
    written = [path for path in work_dir.rglob("*") if path.is_file()]
    assert {"log.txt", "prediction.nrrd", "model.json", "detections.json"} <= {path.name for path in written}
    assert [str(path) for path in written if MARKER.encode() in path.read_bytes()] == []
    assert not [event for event in events if MARKER in json.dumps(event)]


def test_environment_probe_runs_in_a_child():
    environment = backend.probeEnvironment()
    assert environment["torch"] and environment["MedSSL"] and "torch" not in sys.modules.get("MedSSLCommonLib.backend").__dict__


def test_ark_pretraining_on_datasets_from_the_scene(scene, real_backend, tmp_path):
    """Two datasets with different label sets, built from volume and segmentation nodes, pretrain one
    real Ark bundle whose classes are the union of theirs."""
    from MedSSLCommonLib import nodes
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    array = phantom()
    datasets = []
    for name, organ, value in (("bodies", "body", 60), ("lesions", "lesion", 300)):
        volume = nodes.addVolumeFromArray(array, obliqueMatrix(spacing=(1.0, 1.0, 2.0)), f"ct {name}", scene=scene)
        labels = (array >= value).astype(np.uint8)
        segmentation = nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume),
                                                      {"1": {"name": organ, "color": [0.9, 0.2, 0.2]}}, volume, organ)
        datasets.append({"name": name, "cases": [(volume, segmentation)]})
    trainer = MedSSLTrainerLogic(python=sys.executable)
    bundle = trainer.pretrainOnDatasets(datasets, steps=2, width=4, outputDir=str(tmp_path / "ark"))
    meta = json.loads(open(os.path.join(bundle, "model.json")).read())
    assert meta["method"]["name"] == "ark"
    assert sorted(c["name"] for c in meta["classes"].values()) == ["body", "lesion"]
    assert os.path.isfile(os.path.join(bundle, "weights.safetensors"))


def test_one_slice_volume_gets_a_2d_model(scene, real_backend):
    """A radiograph is a one-slice volume: painting it fine-tunes a 2D network, whose prediction comes
    back as a segmentation on the same one-slice geometry."""
    from MedSSLCommonLib import nodes
    from MedSSLSegmentLib.logic import MedSSLSegmentLogic
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    jj, ii = np.mgrid[:48, :48]
    disc = ((jj - 24) ** 2 + (ii - 20) ** 2 <= 100)
    array = np.where(disc, 400, -600).astype(np.int16)[None]  # (k, j, i) = (1, 48, 48)
    volume = nodes.addVolumeFromArray(array, obliqueMatrix(spacing=(0.7, 0.7, 1.0)), "radiograph", scene=scene)
    painted = nodes.segmentationFromLabelmap(disc.astype(np.uint8)[None], nodes.ijkToRasArray(volume),
                                             {"1": {"name": "lung", "color": [0.2, 0.6, 0.9]}}, volume, "painted")
    trainer = MedSSLTrainerLogic(python=sys.executable)
    bundle = trainer.finetune(volume, painted, initModel="none", steps=80, width=8)
    meta = json.loads(open(os.path.join(bundle, "model.json")).read())
    assert meta["architecture"]["spatial_dims"] == 2
    labels, info = nodes.segmentsLabelmap(trainer.lastOutputs["segmentation"], volume)
    assert labels.shape == (1, 48, 48) and [s["name"] for s in info] == ["lung"]
    raw = MedSSLSegmentLogic(python=sys.executable).segment(volume, bundle)  # no few-shot clean-up
    labels, _info = nodes.segmentsLabelmap(raw, volume)
    dice = 2 * np.sum((labels[0] == 1) & disc) / (np.sum(labels[0] == 1) + disc.sum())
    assert dice > 0.8, dice


def test_fewshot_engine_on_sagittal_paint_and_a_correction_round(scene, real_backend):
    """Paint the lesion on two sagittal planes (numpy axis 2 = ITK i): the default engine (few-shot) segments
    it in 3D; painting one more plane and fine-tuning again starts from the first round's model."""
    from MedSSLCommonLib import nodes
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    array = phantom()
    rng = np.random.default_rng(0)
    array = (array + rng.normal(0, 10, array.shape)).astype(np.int16)
    truth = (array > 200).astype(np.uint8)
    matrix = obliqueMatrix(spacing=(1.1, 0.9, 2.5))
    volume = nodes.addVolumeFromArray(array, matrix, "ct", scene=scene)
    classes = {"1": {"name": "lesion", "color": [1.0, 0.0, 0.0]}}

    def painting(planes):
        painted = np.zeros(array.shape, np.uint8)
        for i in planes:
            painted[:, :, i] = truth[:, :, i]
        return nodes.segmentationFromLabelmap(painted, matrix, classes, volume, "painted")

    trainer = MedSSLTrainerLogic()
    trainer.device = "cpu"
    annotation = painting([13, 17])
    first = trainer.finetune(volume, annotation, initModel="none")
    meta = json.loads(open(os.path.join(first, "model.json")).read())
    assert meta["task"] == "fewshot" and meta["fewshot"]["painted_planes"]["i"] == [13, 17]
    labels, _ = nodes.segmentsLabelmap(trainer.lastOutputs["segmentation"], volume)
    hidden = np.ones(array.shape, bool)
    hidden[:, :, [13, 17]] = False
    def dice(pred):
        return 2 * ((pred > 0) & (truth > 0) & hidden).sum() / (((pred > 0) & hidden).sum() + (truth[hidden] > 0).sum())

    # the trivial baseline a user has: interpolation between the same planes (Fill between slices), which has
    # nothing outside i = 13..17 (measured: 0.75; the engine 0.95). A global threshold is no baseline here:
    # the phantom's truth is one, by construction.
    from MedSSL.tasks.evaluate import interpolate_between_slices

    sparse = np.full(array.shape, 255, np.uint8)
    sparse[:, :, [13, 17]] = truth[:, :, [13, 17]]
    baseline = dice(interpolate_between_slices(sparse, axis=2, spacing=(2.5, 0.9, 1.1)))
    assert dice(labels) > max(0.8, baseline + 0.1), (dice(labels), baseline)

    # round 2: the user paints one more plane into the same segmentation and runs it again
    assert trainer.previousFewShotModel(volume, annotation) == first
    more = np.zeros(array.shape, np.uint8)
    more[:, :, [13, 15, 17]] = truth[:, :, [13, 15, 17]]
    annotation.GetSegmentation().RemoveAllSegments()
    nodes._importLabels(annotation, more, matrix, volume, 1)
    nodes._nameAndOrderSegments(annotation.GetSegmentation(), nodes.normaliseClasses(classes))
    second = trainer.finetune(volume, annotation, initModel="none")  # round 2 starts from round 1's model
    assert trainer.lastInit == first and second != first
    meta = json.loads(open(os.path.join(second, "model.json")).read())
    assert meta["init"]["fewshot_round"] is True and meta["fewshot"]["painted_planes"]["i"] == [13, 15, 17]
