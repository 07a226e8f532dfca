"""Bad input to finetune / predict / suggest: exit 2, one line naming the input, no output left behind."""

import numpy as np
import pytest
import torch

from MedSSL.commands.cli import main
from MedSSL.io.volumes import write_volume
from finetune_helpers import blobs_ct, segment_bundle, volume

torch.set_num_threads(1)
TINY = ["--width", "4", "--patch", "16", "16", "8", "--steps", "1", "--device", "cpu", "--progress", "none"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    image, labels = blobs_ct((16, 16, 10), seed=0)
    write_volume(volume(image, spacing=(2.0, 2.0, 3.0)), d / "img.nii.gz")
    write_volume(volume(labels, spacing=(2.0, 2.0, 3.0)), d / "lab.nii.gz")
    write_volume(volume(labels, spacing=(2.0, 2.0, 2.0)), d / "off_grid.nii.gz")
    write_volume(volume(labels[:, :, :8], spacing=(2.0, 2.0, 3.0)), d / "short.nii.gz")
    fractional = labels.astype(np.float32)
    fractional[0, 0, 0] = 0.5
    write_volume(volume(fractional, spacing=(2.0, 2.0, 3.0)), d / "fractional.nrrd")
    write_volume(volume(np.full(labels.shape, 255, np.uint8), spacing=(2.0, 2.0, 3.0)), d / "nothing.nii.gz")
    only_bg = np.where(labels > 0, 255, 0).astype(np.uint8)
    write_volume(volume(only_bg, spacing=(2.0, 2.0, 3.0)), d / "only_background.nii.gz")
    big = labels.astype(np.uint16)
    big[big == 1] = 300
    write_volume(volume(big, spacing=(2.0, 2.0, 3.0)), d / "value300.nrrd")
    negative = labels.astype(np.int16)
    negative[0, 0, 0] = -1
    write_volume(volume(negative, spacing=(2.0, 2.0, 3.0)), d / "negative.nrrd")
    write_volume(volume(image[:, :, :1]), d / "one_slice.nii.gz")
    segment_bundle(d / "seg", patch=(16, 16, 8))
    segment_bundle(d / "two_channels", in_channels=2, patch=(16, 16, 8))
    segment_bundle(d / "pretrain", task="pretrain", patch=(16, 16, 8))
    segment_bundle(d / "flat", spatial_dims=2, patch=(16, 16, 8))
    (d / "empty.csv").write_text("image,label\n", encoding="utf-8")
    (d / "unknown.csv").write_text(f"{d / 'img.nii.gz'},benign\n{d / 'img.nii.gz'},malignant\n", encoding="utf-8")
    (d / "missing.csv").write_text("nope.nii.gz,a\nimg.nii.gz,b\n", encoding="utf-8")
    (d / "one_class.csv").write_text("img.nii.gz,a\nimg.nii.gz,a\n", encoding="utf-8")
    return d


def run_bad(argv, capsys, named, outputs):
    if argv[0] in ("finetune", "predict", "suggest") and "--device" not in argv:
        argv = [*argv, "--device", "cpu"]  # explicit: on a GPU machine the checks run on CPU as tuned
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medssl: error: "), err
    assert named in err[0], err[0]
    assert "Traceback" not in err[0]
    for path in outputs:
        assert not path.exists(), f"{path} was left behind"
    return err[0]


def ft(files, label, out, *extra):
    return ["finetune", "--image", str(files / "img.nii.gz"), "--label", str(files / label), "--out", str(out), *TINY, *extra]


@pytest.mark.parametrize("label, reason", [
    ("off_grid.nii.gz", "not on the grid"),
    ("short.nii.gz", "not on the grid"),
    ("fractional.nrrd", "non-integer"),
    ("nothing.nii.gz", "nothing is annotated"),
    ("only_background.nii.gz", "no class voxels"),
    ("value300.nrrd", "values up to 300"),
    ("negative.nrrd", "negative"),
])
def test_bad_labels(files, tmp_path, capsys, label, reason):
    message = run_bad(ft(files, label, tmp_path / "out"), capsys, str(files / label), [tmp_path / "out"])
    assert reason in message


def test_unknown_class_and_bad_class_lists(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert "label value(s) 1" in run_bad(ft(files, "lab.nii.gz", out, "--classes", "2=liver"), capsys, "--classes 2=liver", [out])
    assert "no annotated voxels" in run_bad(ft(files, "lab.nii.gz", out, "--classes", "1=a,4=b"), capsys, "--classes", [out])
    run_bad(ft(files, "lab.nii.gz", out, "--classes", "spleen"), capsys, "--classes spleen", [out])
    run_bad(ft(files, "lab.nii.gz", out, "--classes", "255=x"), capsys, "255", [out])
    run_bad(ft(files, "lab.nii.gz", out, "--classes", str(tmp_path / "none.json")), capsys, "none.json", [out])


def test_bad_training_options(files, tmp_path, capsys):
    out = tmp_path / "out"
    run_bad(["finetune", "--image", str(files / "img.nii.gz"), "--out", str(out), *TINY], capsys, "--label", [out])
    run_bad(ft(files, "lab.nii.gz", out, "--patch", "16", "16", "12"), capsys, "--patch", [out])
    run_bad(ft(files, "lab.nii.gz", out, "--init", str(tmp_path / "missing")), capsys, "missing", [out])
    # a one-slice image trains a 2D network (test_finetune_2d.py); a 3D label map does not fit it
    run_bad(["finetune", "--image", str(files / "one_slice.nii.gz"), "--label", str(files / "lab.nii.gz"),
             "--out", str(out), *TINY], capsys, "lab.nii.gz", [out])
    segment_bundle(tmp_path / "w8", width=8)
    run_bad(ft(files, "lab.nii.gz", out, "--init", str(tmp_path / "w8")), capsys, "--width 4", [out])


def test_classify_csv_problems(files, tmp_path, capsys):
    out = tmp_path / "out"
    cls = ["finetune", "--task", "classify", "--out", str(out), *TINY, "--csv"]
    run_bad([*cls, str(files / "empty.csv")], capsys, "empty.csv", [out])
    assert "unknown class 'benign'" in run_bad([*cls, str(files / "unknown.csv"), "--classes", "0=normal,1=malignant"],
                                               capsys, "unknown.csv", [out])
    run_bad([*cls, str(files / "missing.csv")], capsys, "nope.nii.gz", [out])
    run_bad([*cls, str(files / "one_class.csv")], capsys, "two classes", [out])
    run_bad([*cls, str(tmp_path / "none.csv")], capsys, "none.csv", [out])


def test_models_that_do_not_fit(files, tmp_path, capsys):
    pred = tmp_path / "pred.nii.gz"
    img = str(files / "img.nii.gz")
    run_bad(["predict", "--model", str(files / "seg"), "--image", str(files / "one_slice.nii.gz"), "--out", str(pred)],
            capsys, "one_slice.nii.gz", [pred])
    # a network of 2 input channels with no position channels described: the model is refused, by name
    assert "input channels" in run_bad(["predict", "--model", str(files / "two_channels"), "--image", img, "--out", str(pred)],
                                       capsys, str(files / "two_channels"), [pred])
    run_bad(["predict", "--model", str(files / "flat"), "--image", img, "--out", str(pred)], capsys, img, [pred])
    assert "fine-tune it first" in run_bad(["predict", "--model", str(files / "pretrain"), "--image", img, "--out", str(pred)],
                                           capsys, str(files / "pretrain"), [pred])
    run_bad(["predict", "--model", str(files / "seg"), "--image", img, "--out", str(tmp_path / "pred.txt")], capsys,
            "pred.txt", [tmp_path / "pred.txt"])
    run_bad(["predict", "--model", str(files / "seg"), "--image", img, "--out", str(pred), "--annotation",
             str(files / "off_grid.nii.gz")], capsys, "off_grid.nii.gz", [pred])


def test_suggest_refuses_a_classifier(files, tmp_path, capsys):
    (tmp_path / "t.csv").write_text("img.nii.gz,a\nimg.nii.gz,b\n".replace("img.nii.gz", str(files / "img.nii.gz")), encoding="utf-8")
    assert main(["finetune", "--device", "cpu", "--task", "classify", "--csv", str(tmp_path / "t.csv"), "--out", str(tmp_path / "cls"),
                 *TINY]) == 0
    out = tmp_path / "s.json"
    message = run_bad(["suggest", "--model", str(tmp_path / "cls"), "--image", str(files / "img.nii.gz"), "--out", str(out)],
                      capsys, str(tmp_path / "cls"), [out])
    assert "classify" in message
    run_bad(["suggest", "--model", str(files / "seg"), "--image", str(files / "img.nii.gz"), "--label",
             str(files / "off_grid.nii.gz"), "--out", str(out)], capsys, "off_grid.nii.gz", [out])
