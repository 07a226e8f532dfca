"""Slicer paths that the other module tests only run against the stand-in backend, run once against the real
one (torch on the CPU, width 4, a few steps, 16x32x32 volumes): the methods list that switches the Ark UI,
pretraining from volume nodes and folders, fine-tuning from that real pretrained model (the pretrain ->
fine-tune chain), classification through apply, model info of an official-format .pt, failure reporting,
and non-blocking polling then cancel. Skipped when the backend CLI or torch is not available."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedSSLCommonLib import backend, jobs
from slicer_testing_helpers import obliqueMatrix

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
REASON = None if importlib.util.find_spec("torch") and backend.backendRoot() else "MedSSL backend or torch not available"
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def real_backend(real_backend, monkeypatch):
    """The root conftest's real backend, one thread per process here."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def trainer_logic():
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    logic = MedSSLTrainerLogic(python=sys.executable)
    logic.device = "cpu"
    return logic


def segment_logic():
    from MedSSLSegmentLib.logic import MedSSLSegmentLogic

    logic = MedSSLSegmentLogic()
    logic.device = "cpu"
    return logic


def test_methods_list_comes_from_the_backend_and_marks_the_dataset_method(real_backend):
    methods = {m["name"]: m for m in trainer_logic().availableMethods()}
    assert {"genesis", "semantic-genesis", "transvw", "dira", "caid", "adam", "ark"} <= set(methods)
    assert methods["ark"]["data"].startswith("--datasets")  # what switches the Trainer to its datasets picker
    assert all(methods[name]["data"].startswith("--data ") for name in methods if name != "ark")


def body_volume(shape=(16, 32, 32)):
    """(k, j, i): body (60 HU) in every slice, a 300 HU lesion, a little air around. Pretraining (the
    Trainer leaves the backend's 64x64x32 cubes) needs shape (32, 64, 64): cubes at least half body."""
    k, j, i = shape
    array = np.full(shape, -800, np.int16)
    array[:, j // 8:j - j // 8, i // 8:i - i // 8] = 60
    array[k // 3:k - k // 3, 3 * j // 8:5 * j // 8, 3 * i // 8:5 * i // 8] = 300
    return array


def test_pretrain_from_nodes_and_folders_then_fine_tune_from_that_model(scene, real_backend, tmp_path):
    """The pretrain -> fine-tune chain as the Trainer runs it: a volume node and a folder pretrain a real
    bundle, which then initialises fine-tuning on a (smaller) volume with every slice painted (dense labels:
    the network path, where the initial model applies), and the new model segments it for review."""
    from MedSSL.data.phantom import make_phantom
    from MedSSL.io.volumes import write_volume
    from MedSSLCommonLib import nodes

    folder = tmp_path / "unlabeled"
    folder.mkdir()
    write_volume(make_phantom(0, shape=(72, 72, 40), spacing=(5.0, 5.0, 8.0)).image, folder / "v0.nii.gz")
    large = nodes.addVolumeFromArray(body_volume((32, 64, 64)), obliqueMatrix(spacing=(1.1, 0.9, 2.5)), "large",
                                     scene=scene)
    trainer = trainer_logic()
    events = []
    pretrained = trainer.pretrain([large, str(folder)], steps=1, width=4, outputDir=str(tmp_path / "pretrained"),
                                  onEvent=events.append)
    meta = json.loads(Path(pretrained, "model.json").read_text(encoding="utf-8"))
    assert meta["task"] == "pretrain" and meta["method"]["name"] == "genesis"
    assert meta["data_summary"]["volumes"] == 2 and meta["architecture"]["width"] == 4
    assert any(e.get("event") == "progress" and e.get("stage") == "pretrain" for e in events)
    assert not any(Path(trainer.lastJob.jobDir).glob("inputs/*"))  # the node's copy is gone

    array = body_volume()
    matrix = obliqueMatrix(spacing=(1.1, 0.9, 2.5))
    volume = nodes.addVolumeFromArray(array, matrix, "ct", scene=scene)
    labels = np.where(array > 0, 1, 0).astype(np.uint8)
    labels[array > 200] = 2
    classes = {"1": {"name": "body", "color": [0.9, 0.7, 0.6]}, "2": {"name": "lesion", "color": [1.0, 0.0, 0.0]}}
    painting = nodes.segmentationFromLabelmap(labels, matrix, classes, volume, "painted")
    model = trainer.finetune(volume, painting, initModel=pretrained, steps=2, cleanup=False,
                             outputDir=str(tmp_path / "finetuned"))
    tuned = json.loads(Path(model, "model.json").read_text(encoding="utf-8"))
    assert tuned["task"] == "segment" and tuned["architecture"]["width"] == 4
    assert tuned["init"]["source"] == "bundle" and tuned["init"]["method"] == "genesis"
    review = trainer.lastOutputs["segmentation"]
    segments = review.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())] == ["body", "lesion"]


def classifier(tmp_path) -> Path:
    """A tiny real classification bundle (the Trainer has no classification training: made with the CLI)."""
    from MedSSL.commands.cli import main
    from MedSSL.io.volumes import Volume, write_volume

    rows = ["image,label"]
    for i in range(4):
        array = body_volume() if i % 2 else np.full((16, 32, 32), 60, np.int16)
        write_volume(Volume(array.transpose(2, 1, 0).copy(), np.array([1.0, 1.0, 2.0]), np.zeros(3), np.eye(3)),
                     tmp_path / f"c{i}.nii.gz")
        rows.append(f"c{i}.nii.gz,{'lesion' if i % 2 else 'plain'}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "classifier"
    assert main(["finetune", "--task", "classify", "--csv", str(tmp_path / "cases.csv"), "--out", str(out),
                 "--width", "4", "--patch", "16", "16", "8", "--steps", "2", "--batch-size", "2", "--device", "cpu",
                 "--progress", "none"]) == 0
    return out


def test_apply_classifies_model_info_of_a_pt_and_failures_are_one_line(scene, real_backend, tmp_path):
    from MedSSLCommonLib import nodes

    sys.path.insert(0, str(REPO / "Testing" / "Python"))
    from medssl_testing import official_checkpoint

    volume = nodes.addVolumeFromArray(body_volume(), obliqueMatrix(spacing=(1.0, 1.0, 2.0)), "ct", scene=scene)
    logic = segment_logic()
    bundle = classifier(tmp_path)
    table = logic.apply(volume, str(bundle))
    assert table.IsA("vtkMRMLTableNode") and table.GetNumberOfRows() == 2
    names = {table.GetCellText(r, 0) for r in range(2)}
    probabilities = [float(table.GetCellText(r, 1)) for r in range(2)]
    assert names == {"lesion", "plain"} and sum(probabilities) == pytest.approx(1.0, abs=1e-3)
    assert table.GetAttribute("MedSSL.predictedClass") in names

    official_checkpoint(tmp_path / "Genesis_Chest_CT.pt", width=4)
    info = logic.modelInfo(str(tmp_path / "Genesis_Chest_CT.pt"))  # through the backend's `info --json`
    assert info["source"] == "official-pt" and info["architecture"]["width"] == 4

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text((bundle / "model.json").read_text(encoding="utf-8"))
    (broken / "weights.safetensors").write_bytes(b"not weights")
    with pytest.raises(jobs.JobError) as failure:
        logic.apply(volume, str(broken))
    message = str(failure.value)
    assert "weights" in message and "Traceback" not in message and "\n" not in message, message
    assert failure.value.job.status == jobs.FAILED


def test_a_running_job_is_polled_without_blocking_and_cancelled(scene, real_backend, tmp_path):
    """Event-driven: the job is cancelled as soon as it reports a training step; nothing is written."""
    from MedSSLCommonLib import nodes

    volume = nodes.addVolumeFromArray(body_volume((32, 64, 64)), obliqueMatrix(spacing=(1.0, 1.0, 2.0)), "ct",
                                      scene=scene)
    trainer = trainer_logic()
    events = []
    out = tmp_path / "never"
    job = trainer.pretrain([volume], steps=100000, width=4, outputDir=str(out), blocking=False, onEvent=events.append)
    assert job.status == jobs.RUNNING  # returned at once
    deadline = time.monotonic() + 300  # a bound for a broken backend, not a budget
    while not any(e.get("event") == "progress" and e.get("stage") == "pretrain" for e in events):
        assert job.status == jobs.RUNNING, job.error
        assert time.monotonic() < deadline, "no training step reported"
        job.poll()
        time.sleep(0.05)
    job.cancel()
    assert job.status == jobs.CANCELLED and not job.running
    assert not (out / "model.json").exists()
    assert not Path(job.jobDir, "inputs").exists()
