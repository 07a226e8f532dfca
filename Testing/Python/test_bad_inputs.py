"""Every command on the bad-input corpus (Testing/bad_inputs.py): a non-zero exit, one line on stderr
that names the input, no traceback, and nothing written where the output would go (not even the output
folder or its lock file). Unreadable models (a text file, a truncated image, an empty folder, a broken
model.json) are given to every command that reads a model, and non-positive budgets to the training ones."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from MedSSL.commands.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bad_inputs import build_corpus, good_image  # noqa: E402

torch.set_num_threads(1)
TINY = ["--width", "4", "--patch", "16", "16", "8", "--device", "cpu", "--progress", "none"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    cases = build_corpus(root / "cases")
    label = np.full((16, 24, 24), 255, np.uint8)  # (z, y, x): slice 8 painted
    label[8] = 0
    label[8, 8:16, 8:16] = 1
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "label.nii.gz"))
    cases["label"] = root / "label.nii.gz"
    model = root / "model"
    status = main(["finetune", "--image", str(cases["image"]), "--label", str(cases["label"]), "--out", str(model),
                   "--steps", "2", "--engine", "network", *TINY])  # a network bundle: predict/suggest need no painting
    assert status == 0
    cases["model"] = model
    good_image(root / "other.nii.gz", seed=1)
    cases["other"] = root / "other.nii.gz"
    return cases


def _outputs(tmp_path):
    return {"out": tmp_path / "out", "pred": tmp_path / "pred.nii.gz", "json": tmp_path / "r.json"}


def commands(c, o):
    """(case, expected text in the message, argv) for every command the case applies to."""
    img, lab, model = str(c["image"]), str(c["label"]), str(c["model"])
    runs = []
    for case in ("missing_path", "empty_file", "text_named_nii", "truncated_nifti", "four_d", "non_finite"):
        bad = str(c[case])
        runs += [
            (case, bad, ["pretrain", "--data", bad, "--out", str(o["out"]), "--steps", "1", *TINY]),
            (case, bad, ["finetune", "--image", bad, "--label", lab, "--out", str(o["out"]), "--steps", "1", *TINY]),
            (case, bad, ["predict", "--device", "cpu", "--model", model, "--image", bad, "--out", str(o["pred"])]),
            (case, bad, ["suggest", "--device", "cpu", "--model", model, "--image", bad, "--out", str(o["json"])]),
            (case, bad, ["evaluate", "--pred", bad, "--truth", lab, "--json", str(o["json"])]),
        ]
    runs += [
        ("mixed_2d_3d", str(c["mixed_2d_3d"]), ["pretrain", "--data", str(c["mixed_2d_3d"]), "--out", str(o["out"]), "--steps", "1", *TINY]),
        ("folder_without_dicom", str(c["folder_without_dicom"]), ["pretrain", "--data", str(c["folder_without_dicom"]), "--out", str(o["out"]), *TINY]),
        ("folder_without_dicom", str(c["folder_without_dicom"]), ["predict", "--device", "cpu", "--model", model, "--image", str(c["folder_without_dicom"]), "--out", str(o["pred"])]),
        ("unknown_method", "no-such-method", ["pretrain", "--data", img, "--method", "no-such-method", "--out", str(o["out"]), *TINY]),
    ]
    for case in ("label_off_grid", "fractional_label", "nothing_annotated"):
        runs.append((case, str(c[case]), ["finetune", "--image", img, "--label", str(c[case]), "--out", str(o["out"]), "--steps", "1", *TINY]))
    for case in ("not_a_model", "empty_model_folder", "broken_model_json", "text_named_nii", "truncated_nifti"):
        bad = str(c[case])
        runs += [
            (case, bad, ["pretrain", "--data", img, "--init", bad, "--out", str(o["out"]), "--steps", "1", *TINY]),
            (case, bad, ["finetune", "--image", img, "--label", lab, "--init", bad, "--out", str(o["out"]), "--steps", "1", *TINY]),
            (case, bad, ["predict", "--model", bad, "--image", img, "--out", str(o["pred"])]),
            (case, bad, ["suggest", "--model", bad, "--image", img, "--out", str(o["json"])]),
            (case, bad, ["info", bad]),
        ]
    for flag, value in (("--max-time", "-5"), ("--max-time", "0"), ("--steps", "-3")):
        runs += [
            ("non_positive_budget", flag, ["pretrain", "--data", img, "--out", str(o["out"]), flag, value, *TINY]),
            ("non_positive_budget", flag, ["finetune", "--image", img, "--label", lab, "--out", str(o["out"]), flag, value, *TINY]),
        ]
    bad_out = c["unwritable_output"]
    runs += [
        ("unwritable_output", str(bad_out.parent), ["pretrain", "--data", img, "--out", str(bad_out), "--steps", "1", *TINY]),
        ("unwritable_output", str(bad_out.parent), ["finetune", "--image", img, "--label", lab, "--out", str(bad_out), "--steps", "1", *TINY]),
        ("unwritable_output", str(bad_out.parent), ["predict", "--model", model, "--image", img, "--out", str(bad_out / "pred.nii.gz")]),
        ("unwritable_output", str(bad_out.parent), ["evaluate", "--pred", lab, "--truth", lab, "--json", str(bad_out / "r.json")]),
    ]
    return runs


CASE_COUNT = 72


def test_the_corpus_covers_every_command(corpus, tmp_path):
    runs = commands(corpus, _outputs(tmp_path))
    assert len(runs) == CASE_COUNT
    assert {argv[0] for _, _, argv in runs} == {"pretrain", "finetune", "predict", "suggest", "evaluate", "info"}


@pytest.mark.parametrize("index", range(CASE_COUNT))
def test_bad_input_is_refused_cleanly(corpus, tmp_path, capsys, index):
    outputs = _outputs(tmp_path)
    case, named, argv = commands(corpus, outputs)[index]
    status = main([*argv, "--cache", str(tmp_path / "cache")] if argv[0] == "pretrain" else argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, f"{case}: {argv[0]} gave exit status {status}, not 2 (bad input)"
    assert len(lines) == 1 and lines[0].startswith("medssl: error: "), f"{case}: {argv[0]}: {captured.err!r}"
    assert named in lines[0], f"{case}: {argv[0]} does not name the input: {lines[0]}"
    assert "Traceback" not in captured.err + captured.out
    assert not outputs["pred"].exists() and not outputs["json"].exists()
    assert not (outputs["out"] / "model.json").exists() and not (outputs["out"] / "weights.safetensors").exists()
    assert not outputs["out"].exists(), f"{case}: {argv[0]} left {sorted(p.name for p in outputs['out'].iterdir())}"
