"""Options that no other test exercised, checked by their effect: predict's detection filters
(--min-score at a value that keeps some findings, --min-volume, --max-findings) and --threads; suggest
--axis; finetune --val-fraction and --bn-recalibration; pretrain --no-amp, --cubes-per-volume and
--modality as the bundle records them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from MedSSL.commands.cli import main
from MedSSL.engine import acceleration
from MedSSL.engine.acceleration import precision_name
from MedSSL.io.bundle import load_bundle, read_meta
from MedSSL.io.volumes import write_volume
from finetune_helpers import blobs_ct, volume

SPACING = (1.5, 1.5, 2.0)
TINY = ["--width", "4", "--patch", "16", "16", "16", "--batch-size", "2", "--lr", "3e-3", "--no-augment",
        "--device", "cpu", "--progress", "none"]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Two blob CTs with their labels, and a detector trained on the first (blobs of two sizes, so the
    volume filter has something to separate)."""
    folder = tmp_path_factory.mktemp("blobs")
    for seed, name in ((4, "a"), (5, "b")):
        image, labels = blobs_ct((32, 32, 16), seed=seed, n=6, radius=3)
        write_volume(volume(image, spacing=SPACING), folder / f"{name}.nii.gz")
        write_volume(volume(labels, spacing=SPACING), folder / f"{name}_lab.nii.gz")
    assert main(["finetune", "--image", str(folder / "a.nii.gz"), "--label", str(folder / "a_lab.nii.gz"),
                 "--out", str(folder / "det"), "--steps", "60", "--detection", *TINY, "--width", "8"]) == 0
    return folder


def _detections(folder, tmp_path, *extra) -> list:
    out = tmp_path / f"det{len(list(tmp_path.iterdir()))}.json"
    assert main(["predict", "--model", str(folder / "det"), "--image", str(folder / "a.nii.gz"), "--out",
                 str(tmp_path / "p.nii.gz"), "--detections", str(out), "--device", "cpu", "--progress", "none",
                 *extra]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_detection_filters_keep_what_they_say(blobs, tmp_path):
    """Every finding, then each filter at a value inside the range of what was found: the kept findings are
    exactly those of the full list that pass it, best first, and some are kept and some dropped."""
    every = _detections(blobs, tmp_path)
    assert len(every) >= 3, every
    scores = sorted(d["score"] for d in every)
    volumes = sorted(d["volume_mm3"] for d in every)
    min_score, min_volume = scores[len(scores) // 2], volumes[len(volumes) // 2]

    def key(found):
        return [(d["label"], tuple(d["center_mm"])) for d in found]

    by_score = _detections(blobs, tmp_path, "--min-score", str(min_score))
    assert 0 < len(by_score) < len(every) and key(by_score) == key([d for d in every if d["score"] >= min_score])
    by_volume = _detections(blobs, tmp_path, "--min-volume", str(min_volume))
    assert 0 < len(by_volume) < len(every) and key(by_volume) == key([d for d in every if d["volume_mm3"] >= min_volume])
    best_two = _detections(blobs, tmp_path, "--max-findings", "2")
    assert key(best_two) == key(every[:2])


def test_threads_sets_torch_threads(blobs, tmp_path):
    """--threads N is what torch runs with afterwards (the test harness puts the previous count back)."""
    wanted = 2 if torch.get_num_threads() != 2 else 1
    _detections(blobs, tmp_path, "--threads", str(wanted))
    assert torch.get_num_threads() == wanted


def test_suggest_axis_ranks_slices_of_that_axis(blobs, capsys):
    """--axis 0: every suggestion is an index along axis 0 of the image, not the default axis 2."""
    capsys.readouterr()
    assert main(["suggest", "--model", str(blobs / "det"), "--image", str(blobs / "a.nii.gz"), "--axis", "0",
                 "--count", "20", "--device", "cpu", "--progress", "none"]) == 0
    slices = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["slices"]
    assert slices and {s["axis"] for s in slices} == {0}
    assert max(s["index"] for s in slices) >= 16  # axis 2 has only 16 slices; axis 0 has 32


def _finetune(folder, out, *extra):
    return main(["finetune", "--image", str(folder / "a.nii.gz"), "--label", str(folder / "a_lab.nii.gz"),
                 "--image", str(folder / "b.nii.gz"), "--label", str(folder / "b_lab.nii.gz"), "--out", str(out),
                 "--steps", "4", "--val-every", "2", "--seed", "3", *TINY, *extra])


def test_val_fraction_holds_out_a_volume_for_validation(blobs, tmp_path):
    """Two labelled volumes: --val-fraction 0.5 validates on one of them (a validation loss in the history
    and a best one in the bundle); the default (0) validates nothing."""
    assert _finetune(blobs, tmp_path / "none") == 0
    assert _finetune(blobs, tmp_path / "half", "--val-fraction", "0.5") == 0
    plain, held = read_meta(tmp_path / "none"), read_meta(tmp_path / "half")
    assert plain["training"]["best_val_loss"] is None and not any("val_loss" in h for h in plain["history"])
    assert held["training"]["best_val_loss"] is not None and any("val_loss" in h for h in held["history"])


def test_bn_recalibration_recomputes_only_the_batchnorm_statistics(blobs, tmp_path):
    """Same seed and steps: --bn-recalibration 0 keeps training's running statistics, the default recomputes
    them on training patches; the learned weights are the same either way."""
    assert _finetune(blobs, tmp_path / "kept", "--bn-recalibration", "0") == 0
    assert _finetune(blobs, tmp_path / "recomputed", "--bn-recalibration", "4") == 0
    kept, recomputed = load_bundle(tmp_path / "kept")[1], load_bundle(tmp_path / "recomputed")[1]
    stats = [k for k in kept if k.endswith(("running_mean", "running_var"))]
    assert stats and any(not torch.equal(kept[k], recomputed[k]) for k in stats)
    for k in kept:
        if k not in stats and not k.endswith("num_batches_tracked"):
            assert torch.equal(kept[k], recomputed[k]), k
    assert "recomputed on 4 batches" in read_meta(tmp_path / "recomputed")["batchnorm"]
    assert read_meta(tmp_path / "kept")["batchnorm"].startswith("running statistics")


def test_pretrain_precision_cube_count_and_modality_reach_the_bundle(large_phantoms, tmp_path, capsys, monkeypatch):
    """--no-amp trains and records fp32 where the default is bf16 autocast (a CPU with native bf16, patched
    in so every machine takes that path); --cubes-per-volume 3 cuts 3 cubes from each of the 3 volumes; --modality MR normalises as MR
    and says so, where the phantoms' HU values would be read as CT."""
    base = ["pretrain", "--data", str(large_phantoms), "--cache", str(tmp_path / "cache"), "--width", "4",
            "--patch", "24", "16", "8", "--batch-size", "2", "--steps", "1", "--device", "cpu", "--progress", "json"]
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: True)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "fp32"), "--no-amp", "--cubes-per-volume", "3", "--modality", "MR"]) == 0
    logs = [json.loads(line).get("message", "") for line in capsys.readouterr().out.splitlines()]
    counts = [re.search(r"(\d+) training and (\d+) validation cubes", m) for m in logs]
    counts = [c for c in counts if c]
    assert counts and sum(map(int, counts[0].groups())) == 3 * 3, logs
    meta = read_meta(tmp_path / "fp32")
    assert meta["training"]["precision"] == "fp32" and meta["preprocessing"]["modality"] == "MR"
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    meta = read_meta(tmp_path / "default")
    assert meta["training"]["precision"] == precision_name(torch.device("cpu"), True) != "fp32"
    assert meta["preprocessing"]["modality"] == "CT"
