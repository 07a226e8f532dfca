"""Volume classification end to end on tiny synthetic volumes: CSV in, bundle out, JSON predictions."""

import json

import numpy as np
import pytest
import torch

from MedSSL.io.bundle import load_bundle, read_meta
from MedSSL.commands.cli import main
from MedSSL.models.classifier import ClassifierNet
from MedSSL.tasks.finetune.classify import read_csv_rows
from MedSSL.transforms.resize import fit_to_patch
from MedSSL.io.volumes import write_volume
from finetune_helpers import ball, volume

torch.set_num_threads(1)


def case(kind: str, seed: int, shape=(20, 20, 12)) -> np.ndarray:
    """int16 HU: soft tissue with a bright ball ("lesion") or without ("normal")."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 15, size=shape)
    if kind == "lesion":
        image[ball(shape, [rng.uniform(6, s - 6) for s in shape], 4)] += 500
    return image.round().astype(np.int16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    (folder / "vols").mkdir()
    rows = ["image,label"]
    for i in range(12):
        kind = "lesion" if i % 2 else "normal"
        # different sizes: every volume is resized to the patch
        write_volume(volume(case(kind, i, shape=(20 + i % 3 * 4, 20, 12)), spacing=(2.0, 2.0, 3.0)), folder / "vols" / f"v{i}.nii.gz")
        rows.append(f"vols/v{i}.nii.gz,{kind}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bundle(dataset):
    out = dataset / "model"
    assert main(["finetune", "--task", "classify", "--csv", str(dataset / "train.csv"), "--out", str(out),
                 "--width", "4", "--patch", "16", "16", "8", "--steps", "60", "--lr", "3e-3", "--batch-size", "4",
                 "--device", "cpu", "--progress", "none"]) == 0
    return out


def test_bundle_describes_a_classifier(bundle):
    meta = read_meta(bundle)
    assert meta["task"] == "classify" and meta["input_fit"] == "resize"
    assert meta["classes"] == {"0": {"name": "lesion", "color": meta["classes"]["0"]["color"]},
                               "1": {"name": "normal", "color": meta["classes"]["1"]["color"]}}
    assert meta["class_values"] == [0, 1] and meta["architecture"]["out_channels"] == 2
    assert meta["data_summary"]["class_counts"] == {"0": 6, "1": 6}
    _, state = load_bundle(bundle)
    assert state["head.0.weight"].shape == (1024, 64)  # GAP(16w = 64 channels) -> 1024
    assert state["head.2.weight"].shape == (2, 1024)
    assert any(k.startswith("backbone.down_tr64") for k in state)


def test_predict_writes_probabilities_json(bundle, dataset, tmp_path, capsys):
    correct = 0
    kinds = ["lesion", "normal"] * 8
    for i, kind in enumerate(kinds):
        write_volume(volume(case(kind, 100 + i), spacing=(2.0, 2.0, 3.0)), tmp_path / f"t{i}.nrrd")
        out = tmp_path / f"p{i}.json"
        assert main(["predict", "--model", str(bundle), "--image", str(tmp_path / f"t{i}.nrrd"), "--out", str(out),
                     "--device", "cpu", "--progress", "none"]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        result = json.loads(out.read_text(encoding="utf-8"))
        assert printed == result
        assert set(result["probabilities"]) == {"lesion", "normal"}
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert result["name"] == max(result["probabilities"], key=result["probabilities"].get)
        assert result["label"] == {"lesion": 0, "normal": 1}[result["name"]]
        correct += result["name"] == kind
    # baselines on these 16 balanced cases: one class for all 8/16, a coin flip >= 15/16 with p = 17/65536;
    # the width-4, 60-step classifier got 16/16 with --seed 0-3
    assert correct >= 15, correct


def test_integer_labels_classes_option_and_init_from_the_classifier(dataset, bundle, tmp_path):
    rows = [f"{dataset / 'vols' / f'v{i}.nii.gz'},{i % 2 * 5}" for i in range(6)]  # absolute paths, values 0 and 5
    (tmp_path / "t.csv").write_text("\n".join(rows), encoding="utf-8")
    assert main(["finetune", "--task", "classify", "--csv", str(tmp_path / "t.csv"), "--out", str(tmp_path / "m"),
                 "--classes", "0=normal,5=lesion", "--init", str(bundle), "--patch", "16", "16", "8", "--steps", "2",
                 "--device", "cpu", "--progress", "none"]) == 0
    meta = read_meta(tmp_path / "m")
    assert meta["class_values"] == [0, 5] and meta["classes"]["5"]["name"] == "lesion"
    assert meta["init"]["source"] == "bundle" and meta["init"]["task"] == "classify"
    assert meta["architecture"]["width"] == 4


def test_csv_rows_and_resizing(tmp_path):
    (tmp_path / "a.csv").write_text("x.nii.gz, 1\n\n/abs/y.nrrd,benign\n", encoding="utf-8")
    rows = read_csv_rows(tmp_path / "a.csv")
    assert rows[0][0] == tmp_path / "x.nii.gz" and rows[0][1] == "1" and rows[1][0].as_posix() == "/abs/y.nrrd"
    assert rows[1][2] == 3  # row numbers as in the file
    assert fit_to_patch(np.zeros((30, 20, 7), np.float32), (16, 16, 8)).shape == (1, 16, 16, 8)
    net = ClassifierNet(width=4, n_classes=3)
    assert net(torch.zeros(2, 1, 16, 16, 8)).shape == (2, 3)
