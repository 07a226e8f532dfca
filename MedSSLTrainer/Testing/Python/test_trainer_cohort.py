"""MedSSLCohortLogic against real MRML (slicer-core) and the real backend (width 4, a few steps): scans added
to a cohort (painted, then a reviewed segmentation), the model refreshed from the previous one, the next scan
drafted and corrected on a repainted plane, classes matched by name, and nothing joining the cohort when the
model could not be written."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from MedSSLCommonLib import backend, nodes
from slicer_testing_helpers import obliqueMatrix

REASON = None if importlib.util.find_spec("torch") and backend.backendRoot() else "MedSSL backend or torch not available"
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def real_backend(real_backend, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def cohort_logic(tmp_path):
    from MedSSLTrainerLib.cohort import MedSSLCohortLogic

    logic = MedSSLCohortLogic(cohortDir=str(tmp_path / "cohort"), python=sys.executable, device="cpu")
    return logic


def liver_scan(scene, seed, name):
    """A phantom CT as a volume node (oblique, 4 x 4 x 6 mm) and its liver mask (k, j, i)."""
    from MedSSL.data.phantom import make_phantom

    phantom = make_phantom(seed, shape=(48, 48, 24), spacing=(4.0, 4.0, 6.0))
    image = np.ascontiguousarray(phantom.image.array.transpose(2, 1, 0)).astype(np.int16)
    liver = np.ascontiguousarray((phantom.labels.array == 1).transpose(2, 1, 0)).astype(np.uint8)
    volume = nodes.addVolumeFromArray(image, obliqueMatrix(spacing=(4.0, 4.0, 6.0)), name, scene=scene)
    return volume, liver


def segmentation(volume, labels, name, segment="liver"):
    return nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), {"1": {"name": segment}}, volume, name)


def painted_liver(volume, liver, ks, name):
    """A segmentation with the liver painted on the k planes ``ks`` (the rest of a painted plane is its
    background, as the Trainer reads a Segment Editor painting)."""
    planes = np.zeros_like(liver)
    planes[ks] = liver[ks]
    return segmentation(volume, planes, name)


def test_cohort_add_segment_correct_and_refresh(scene, real_backend, tmp_path):
    cohort = cohort_logic(tmp_path)
    assert cohort.model is None
    with pytest.raises(ValueError, match="no model yet"):
        cohort.segmentNext(liver_scan(scene, 5, "x")[0])
    first, liver1 = liver_scan(scene, 0, "scan 1")
    z = np.flatnonzero(liver1.any(axis=(1, 2)))
    ks = np.round(np.linspace(z[0], z[-1], 5)[1:-1]).astype(int).tolist()
    model1 = cohort.addScan(first, painted_liver(first, liver1, ks, "scan 1 painting"), steps=4, width=4)
    state = cohort.state()
    assert state["round"] == 1 and state["model"] == model1 and len(state["scans"]) == 1
    assert state["classes"] == {"1": {"name": "liver", "color": state["classes"]["1"]["color"]}}
    meta = json.loads((tmp_path / "cohort" / "model-001" / "model.json").read_text(encoding="utf-8"))
    assert meta["architecture"]["width"] == 4 and meta["training"]["steps"] == 4
    assert meta["cohort"]["completion"]["scans"][0]["label"] == "painting completed by the few-shot engine"

    second, liver2 = liver_scan(scene, 1, "scan 2")
    draft = cohort.segmentNext(second)
    assert draft.GetName() == "scan 2 draft"
    draft_labels, segments = nodes.segmentsLabelmap(draft, second)
    assert draft_labels.shape == liver2.shape
    k = int(np.argmax([np.count_nonzero((draft_labels[i] > 0) != (liver2[i] > 0)) for i in range(liver2.shape[0])]))
    fixed = cohort.correct(second, painted_liver(second, liver2, [k], "scan 2 corrections"))
    fixed_labels, _ = nodes.segmentsLabelmap(fixed, second)
    assert np.array_equal(fixed_labels[k] > 0, liver2[k] > 0)  # the repainted plane is kept exactly

    # the reviewed scan joins the cohort as a complete segmentation; the model is refreshed from model 1
    reviewed = segmentation(second, liver2, "scan 2 reviewed", segment="Liver")  # names match case-insensitively
    model2 = cohort.addScan(second, reviewed, complete=True, steps=8)
    state = cohort.state()
    assert state["round"] == 2 and model2.endswith("model-002") and len(state["classes"]) == 1
    assert [s["annotation"] for s in state["scans"]] == ["painted planes", "reviewed segmentation"]
    meta2 = json.loads((tmp_path / "cohort" / "model-002" / "model.json").read_text(encoding="utf-8"))
    assert meta2["init"]["source"] != "scratch" and meta2["training"]["steps"] == 2  # a quarter of 8
    assert meta2["data_summary"]["volumes"] == 2


def test_a_failed_refresh_leaves_the_cohort_as_it_was(scene, real_backend, tmp_path):
    from MedSSLCommonLib.jobs import JobError

    cohort = cohort_logic(tmp_path)
    volume, liver = liver_scan(scene, 0, "scan")
    with pytest.raises(JobError):
        cohort.addScan(volume, painted_liver(volume, liver, [12], "painting"), steps=2, width=4,
                       initModel=str(tmp_path))  # a folder that is no model: the backend refuses it
    assert cohort.state() == {"scans": [], "classes": {}, "model": None, "round": 0}
    assert not (tmp_path / "cohort" / "scans").exists()


def test_unlabelled_scans_self_train_the_model_and_do_not_join_the_cohort(scene, real_backend, tmp_path):
    cohort = cohort_logic(tmp_path)
    volume, liver = liver_scan(scene, 0, "scan 1")
    unlabelled = liver_scan(scene, 1, "scan 2")[0]
    with pytest.raises(ValueError, match="no such file"):
        cohort.addScan(volume, painted_liver(volume, liver, [8, 12], "painting"), unlabeled=[str(tmp_path / "none")])
    model = cohort.addScan(volume, painted_liver(volume, liver, [8, 12], "painting"), steps=4, width=4,
                           unlabeled=[unlabelled])
    meta = json.loads((tmp_path / "cohort" / "model-001" / "model.json").read_text(encoding="utf-8"))
    assert model.endswith("model-001") and meta["cohort"]["self_training"]["unlabeled_scans"] == 1
    assert meta["data_summary"]["volumes"] == 2 and meta["training"]["steps"] == 2  # round 2: half of 4
    assert len(cohort.state()["scans"]) == 1


def test_corrections_must_name_a_class_of_the_cohort():
    from MedSSLTrainerLib.cohort import _matchClasses

    labels = np.array([0, 1, 2, 255], np.uint8)
    known = {"1": {"name": "liver", "color": [1, 0, 0]}}
    out, merged = _matchClasses(labels, {"1": {"name": "spleen", "color": [0, 1, 0]}, "2": {"name": "LIVER", "color": [0, 0, 1]}},
                                known)
    assert out.tolist() == [0, 2, 1, 255] and merged["2"]["name"] == "spleen" and merged["1"] == known["1"]
    with pytest.raises(ValueError, match="not a class of the cohort"):
        _matchClasses(labels, {"1": {"name": "kidney", "color": [0, 0, 0]}}, known, allowNew=False)
