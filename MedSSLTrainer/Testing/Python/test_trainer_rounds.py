"""Issue 19 item 1: correction rounds belong to one image and one painting. With real MRML (slicer-core) and
the stand-in backend writing few-shot models: the next patient after a scene close (same node IDs again)
starts afresh from the user's initial model; a round continues only on the same image content, the same
segmentation and a superset of the painted planes; a few-shot model of another image is refused."""

import json
import os

import numpy as np
import pytest

from slicer_testing_helpers import addVolume, phantom


@pytest.fixture
def logic(scene, fake_backend, monkeypatch):
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    monkeypatch.setenv("FAKE_MEDSSL_TASK", "fewshot")  # the stand-in writes few-shot models
    return MedSSLTrainerLogic()


def painting(volume, planes=(1, 3), name="tissue"):
    """A segmentation painted on whole k planes of the phantom's grid (class ``name``)."""
    from MedSSLCommonLib import nodes

    labels = np.zeros(phantom().shape, np.uint8)
    for k in planes:
        labels[k, 2:8, 3:10] = 1
    return nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), {"1": {"name": name}}, volume,
                                          "painted")


def repaint(segmentation, volume, planes):
    """The user changes the painting of ``segmentation``: now whole k ``planes`` of class "tissue"."""
    from MedSSLCommonLib import nodes

    labels = np.zeros(phantom().shape, np.uint8)
    for k in planes:
        labels[k, 2:8, 3:10] = 1
    segmentation.GetSegmentation().RemoveAllSegments()
    nodes._importLabels(segmentation, labels, nodes.ijkToRasArray(volume), volume, 1)
    nodes._nameAndOrderSegments(segmentation.GetSegmentation(), nodes.normaliseClasses({"1": {"name": "tissue"}}))


def patient(scene, seed):
    """A volume whose voxels differ per ``seed`` (another patient), on the same grid."""
    array = phantom() + np.random.default_rng(seed).integers(0, 20, phantom().shape).astype(np.int16)
    return addVolume(scene, array, name=f"patient {seed}")


def test_next_patient_after_scene_close_does_not_inherit_the_last_model(logic, scene):
    volumeA = patient(scene, 1)
    segmentationA = painting(volumeA)
    modelA = logic.finetune(volumeA, segmentationA, initModel="none", predict=False)
    assert logic.lastRound["round"] == 1 and len(logic.correctionRounds) == 1
    scene.Clear(0)  # File > Close Scene
    assert len(logic.correctionRounds) == 0
    volumeB = patient(scene, 2)
    segmentationB = painting(volumeB)
    assert (volumeB.GetID(), segmentationB.GetID()) == (volumeA.GetID(), segmentationA.GetID())  # IDs again
    assert logic.previousFewShotModel(volumeB, segmentationB) is None
    modelB = logic.finetune(volumeB, segmentationB, initModel="none", predict=False)
    assert logic.lastInit == "none" and logic.lastRound["round"] == 1, logic.lastRound
    assert json.loads(open(os.path.join(modelB, "model.json")).read())["init"] == "none"
    assert modelB != modelA


def test_same_ids_other_image_content_starts_afresh_without_a_scene_close(logic, scene):
    """Even without a close event (a script that swaps the voxels of the node), the content decides."""
    import slicer.util

    volume = patient(scene, 1)
    segmentation = painting(volume)
    logic.finetune(volume, segmentation, initModel="none", predict=False)
    slicer.util.updateVolumeFromArray(volume, slicer.util.arrayFromVolume(volume) + 7)
    logic.finetune(volume, segmentation, initModel="none", predict=False)
    assert logic.lastRound["round"] == 1 and logic.lastInit == "none"
    assert "image differs" in logic.lastRound["reason"]


def test_more_planes_continue_the_round_fewer_or_other_classes_do_not(logic, scene):
    from MedSSLTrainerLib.logic import describeRound

    volume = patient(scene, 1)
    segmentation = painting(volume, (1, 3))
    first = logic.finetune(volume, segmentation, initModel="none", predict=False)
    logic.keepJobFiles = True  # to read the job's log
    repaint(segmentation, volume, (1, 3, 4))  # the user paints plane 4 as well
    assert logic.previousFewShotModel(volume, segmentation) == first
    second = logic.finetune(volume, segmentation, initModel="none", predict=False)
    assert logic.lastRound == {"round": 2, "init": first, "reason": "continues round 1"}
    assert describeRound(logic.lastRound) == f"round 2 on this painting, from the few-shot model {first} (continues round 1)"
    assert logic.lastJob.readLog().count("round 2 on this painting") == 1  # the log says which round runs
    repaint(segmentation, volume, (1,))  # plane 3 erased
    logic.finetune(volume, segmentation, initModel="none", predict=False)
    assert logic.lastRound["round"] == 1 and "no longer painted" in logic.lastRound["reason"]
    assert second != first


def test_a_few_shot_model_of_another_image_is_refused_as_initial_model(logic, scene, tmp_path):
    volume = patient(scene, 1)
    other = tmp_path / "other-patient"
    other.mkdir()
    (other / "model.json").write_text(json.dumps({"task": "fewshot", "data_summary": {"shapes": [[64, 64, 40]]},
                                                  "fewshot": {"painted_planes": {"i": [], "j": [], "k": [20]}}}),
                                      encoding="utf-8")
    with pytest.raises(ValueError, match="fitted on an image of size"):
        logic.finetune(volume, painting(volume), initModel=str(other), predict=False)
    assert not os.listdir(os.path.join(os.environ["MEDSSL_WORK_DIR"], "jobs"))  # nothing half-written
