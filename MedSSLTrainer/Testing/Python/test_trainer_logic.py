"""MedSSLTrainerLogic in blocking mode against the stand-in backend (fake_medssl.py): the job files it
writes, the options it passes, and the nodes it imports. The real backend is exercised in
test_trainer_backend.py."""

import json
import os

import numpy as np
import pytest

from slicer_testing_helpers import addVolume, phantom


@pytest.fixture
def logic(scene, fake_backend):
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    return MedSSLTrainerLogic()


def painted(scene, volume):
    from MedSSLCommonLib import nodes

    labels = np.zeros(phantom().shape, np.uint8)
    labels[1, 2:8, 3:10] = 1
    labels[3, 4:6, 5:7] = 2
    classes = {"1": {"name": "tissue", "color": [0.1, 0.9, 0.1]}, "2": {"name": "lesion", "color": [1.0, 0.0, 0.0]}}
    return nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), classes, volume, "painted")


def test_finetune_then_predict(logic, scene, tmp_path):
    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    logic.keepJobFiles = True  # to read the stand-in's record of the predict arguments
    events = []
    init = tmp_path / "genesis.pt"
    init.write_bytes(b"")
    bundle = logic.finetune(volume, painted(scene, volume), outputDir=str(tmp_path / "model"), initModel=str(init),
                            steps=3, onEvent=events.append)
    assert bundle == str(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "model.json").read_text(encoding="utf-8"))
    assert meta["annotated_slices"] == [1, 3] and meta["label_values"] == [0, 1, 2, 255]
    assert meta["classes"]["2"] == {"name": "lesion", "color": [1.0, 0.0, 0.0]} and meta["init"] == str(init)
    assert [e["stage"] for e in events if e["event"] == "progress"] == ["finetune"] * 3 + ["predict"]
    segmentation = logic.lastOutputs["segmentation"]
    assert segmentation is logic.lastJob.segmentationNode and segmentation.GetName() == "tissue, lesion round 1"
    seg = segmentation.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())] == ["tissue", "lesion"]
    labels, _info = nodes.segmentsLabelmap(segmentation, volume)
    assert np.array_equal(labels, np.where(phantom() > 100, 2, np.where(phantom() > 0, 1, 0)))
    predictArgs = json.loads(open(os.path.join(logic.lastJob.jobDir, "prediction.nrrd.args.json")).read())
    assert predictArgs["annotation"].endswith("label.nrrd")  # few-shot clean-up with the painted labels


def test_finetune_detector_then_detect(logic, scene, tmp_path):
    from MedSSLSegmentLib.logic import MedSSLSegmentLogic

    volume = addVolume(scene, phantom(), name="ct")
    bundle = logic.finetune(volume, painted(scene, volume), predict=False, detection=True)
    applier = MedSSLSegmentLogic()
    applier.minVolumeMm3 = 0.0  # the phantom's lesion is 13 mm^3
    markups = applier.detect(volume, bundle)
    assert [markups.GetNthControlPointLabel(i) for i in range(2)] == ["lesion 0.90", "tissue 0.60"]


def test_finetune_without_prediction_adds_no_node(logic, scene, tmp_path):
    volume = addVolume(scene, phantom(), name="ct")
    segmentation = painted(scene, volume)
    count = scene.GetNumberOfNodes()
    bundle = logic.finetune(volume, segmentation, initModel="none", predict=False)
    assert os.path.isfile(os.path.join(bundle, "model.json")) and scene.GetNumberOfNodes() == count
    assert bundle.startswith(str(tmp_path / "work" / "models"))
    assert json.loads(open(os.path.join(bundle, "model.json")).read())["init"] == "none"


def test_pretrain_from_nodes_and_folder(logic, scene, tmp_path):
    volume = addVolume(scene, phantom(), name="ct")
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    bundle = logic.pretrain([volume, str(folder)], method="genesis", steps=2, maxTime=60)
    meta = json.loads(open(os.path.join(bundle, "model.json")).read())
    assert meta["task"] == "pretrain" and meta["data"] == ["volume-000.nrrd", "unlabeled"]
    assert not os.path.exists(os.path.join(logic.lastJob.jobDir, "inputs"))  # the copy of the scan is gone
    with pytest.raises(ValueError, match="not found"):
        logic.pretrain(str(tmp_path / "missing"))


def test_suggest_slices_in_ras(logic, scene, tmp_path):
    from MedSSLCommonLib import geometry, nodes

    volume = addVolume(scene, phantom(), name="ct")
    model = tmp_path / "m"
    model.mkdir()
    slices = logic.suggestSlices(volume, str(model), count=2, segmentationNode=painted(scene, volume))
    assert len(slices) == 2 and all(s["axis"] == 2 for s in slices)
    assert not {1, 3} & {s["index"] for s in slices}  # painted slices are not suggested again
    for item in slices:
        center = geometry.sliceCenterIndex(phantom().shape, 2, item["index"])
        np.testing.assert_allclose(item["center_ras"], geometry.indexToRas(nodes.ijkToRasArray(volume), center), atol=1e-6)


def test_suggested_slice_centres_are_world_ras_under_a_transform(logic, scene, tmp_path):
    """Issue 11 item 6: a volume under a non-identity linear transform; jumping to a suggestion must land
    on the slice where the volume is shown, i.e. its centre through the transform."""
    import vtk

    from MedSSLCommonLib import geometry, nodes

    volume = addVolume(scene, phantom(), name="ct")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    rotation = [[0.0, -1.0, 0.0, 30.0], [1.0, 0.0, 0.0, -10.0], [0.0, 0.0, 1.0, 5.0]]
    for r, row in enumerate(rotation):
        for c, value in enumerate(row):
            matrix.SetElement(r, c, value)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    model = tmp_path / "m"
    model.mkdir()
    slices = logic.suggestSlices(volume, str(model), count=2)
    for item in slices:
        local = geometry.indexToRas(nodes.ijkToRasArray(volume), geometry.sliceCenterIndex(phantom().shape, 2, item["index"]))
        world = np.array(rotation)[:, :3] @ np.asarray(local) + np.array(rotation)[:, 3]
        np.testing.assert_allclose(item["center_ras"], world, atol=1e-6)


def test_methods_from_backend(logic):
    assert [m["name"] for m in logic.availableMethods()] == ["genesis", "fake", "ark"]


def test_methods_fallback_without_backend(scene, monkeypatch, tmp_path):
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    monkeypatch.setenv("MEDSSL_BACKEND_PATH", str(tmp_path))
    logic = MedSSLTrainerLogic(python=str(tmp_path / "no-python"))
    assert [m["name"] for m in logic.availableMethods()] == ["genesis"]


def test_jump_to_slice_centres_slice_views(scene):
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    MedSSLTrainerLogic.jumpToSlice({"center_ras": [12.5, -30.0, 41.25]})
    sliceToRas = red.GetSliceToRAS()
    assert [sliceToRas.GetElement(r, 3) for r in range(3)] == [12.5, -30.0, 41.25]


def _segmentation(scene, volume, labels, names, name):
    from MedSSLCommonLib import nodes

    classes = {str(i): {"name": n, "color": [0.2 * i, 0.5, 0.5]} for i, n in enumerate(names, start=1)}
    return nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), classes, volume, name)


def test_pretrain_on_datasets_from_scene(logic, scene, tmp_path):
    """Ark's datasets from the scene: segments become each dataset's classes, matched by name across
    cases (numbered as first met), labels on each volume's grid, empty segments left out."""
    a1, a2, b1 = (addVolume(scene, phantom(), name=n) for n in ("a1", "a2", "b1"))
    block, core = np.zeros(phantom().shape, np.uint8), np.zeros(phantom().shape, np.uint8)
    block[1:5, 2:8, 3:10] = 1
    core[1:5, 2:8, 3:10] = 1
    core[2:4, 4:6, 5:7] = 2
    liverFirst = _segmentation(scene, a1, block, ["liver"], "s1")
    swapped = _segmentation(scene, a2, np.where(core == 2, 1, np.where(core == 1, 2, 0)).astype(np.uint8),
                            ["tumour", "liver"], "s2")  # same names, other order: values follow the names
    withEmpty = _segmentation(scene, b1, block, ["spleen", "unused"], "s3")
    datasets = [{"name": "livers", "cases": [(a1, liverFirst), (a2, swapped)]},
                {"name": "spleens", "cases": [(b1, withEmpty)]}]
    bundle = logic.pretrainOnDatasets(datasets, steps=2)
    meta = json.loads(open(os.path.join(bundle, "model.json")).read())
    assert meta["method"] == {"name": "ark"}
    livers, spleens = meta["datasets_seen"]
    assert [c["name"] for c in livers["classes"].values()] == ["liver", "tumour"]
    assert [c["label_values"] for c in livers["cases"]] == [[0, 1], [0, 1, 2]] and all(c["same_grid"] for c in livers["cases"])
    assert spleens["classes"] == {"1": {"name": "spleen", "color": [0.2, 0.5, 0.5]}}
    assert not os.path.exists(os.path.join(logic.lastJob.jobDir, "inputs"))  # copies of the scans are gone


def test_pretrain_on_datasets_refuses_bad_input(logic, scene, tmp_path):
    volume = addVolume(scene, phantom(), name="ct")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    jobs = tmp_path / "work" / "jobs"
    before = set(os.listdir(jobs)) if jobs.is_dir() else set()
    for datasets, message in (([], "at least one"), ([{"name": "x", "cases": []}], "no cases"),
                              ([{"name": "x", "cases": [(volume, empty)]}], "has no segments"),
                              ([{"name": "", "cases": [(volume, empty)]}], "non-empty name"),
                              (str(tmp_path / "missing.json"), "not found")):
        with pytest.raises(ValueError, match=message):
            logic.pretrainOnDatasets(datasets)
    assert (set(os.listdir(jobs)) if jobs.is_dir() else set()) == before  # no job folder left behind


def test_finetune_label_file_holds_only_the_painted_planes_and_the_log_names_them(logic, scene):
    """Item 1 (issue 11): a sagittal stroke becomes one annotated sagittal plane in the label file the
    backend reads (not every axial slice it crosses), and the job log says which planes were used."""
    import SimpleITK as sitk

    from MedSSLCommonLib import nodes

    shape = (10, 12, 14)
    volume = addVolume(scene, np.zeros(shape, np.int16), matrix=np.diag([0.8, 0.8, 2.0, 1.0]), name="mr")
    labels = np.zeros(shape, np.uint8)
    labels[2:8, 3:9, 6] = 1  # painted in a sagittal view
    segmentation = nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), {"1": {"name": "kidney"}},
                                                  volume, "painted")
    logic.keepJobFiles = True  # to read the log afterwards
    bundle = logic.finetune(volume, segmentation, initModel="none", predict=False)
    meta = json.loads(open(os.path.join(bundle, "model.json")).read())
    assert meta["label_values"] == [0, 1, 255] and meta["annotated_planes"] == {"i": [6], "j": [], "k": []}
    log = open(logic.lastJob.logPath, encoding="utf-8").read()
    assert "painted planes: sagittal i=6" in log.splitlines()[0]
    assert logic.lastPlanes == {0: [6], 1: [], 2: []}


@pytest.mark.parametrize("budget", [{"steps": -1}, {"maxTime": -60.0}, {"maxTime": 0.0001 - 1}, {"width": 0}])
def test_non_positive_budgets_are_refused_before_a_job_starts(logic, scene, budget):
    """Issue 11 item 4: a negative time limit used to stop training at once and import an untrained model."""
    volume = addVolume(scene, phantom(), name="ct")
    with pytest.raises(ValueError, match="must be more than 0"):
        logic.finetune(volume, painted(scene, volume), initModel="none", predict=False, **budget)
    with pytest.raises(ValueError, match="must be more than 0"):
        logic.pretrain([volume], **budget)
    assert logic.lastJob is None and not os.path.exists(os.path.join(os.environ["MEDSSL_WORK_DIR"], "jobs"))


def test_pretraining_cache_of_patient_cubes_goes_with_the_job(logic, scene):
    """Issue 11 item 9: the cubes cut from the scans are cached in the job folder, not ~/.cache, and deleted
    with the input copies when the job ends."""
    volume = addVolume(scene, phantom(), name="ct")
    logic.keepJobFiles = True
    logic.pretrain([volume], steps=2)
    left = sorted(os.listdir(logic.lastJob.jobDir))
    assert "cache" not in left and "inputs" not in left and "log.txt" in left
    assert "--cache " + os.path.join(logic.lastJob.jobDir, "cache") in open(logic.lastJob.logPath).read()
