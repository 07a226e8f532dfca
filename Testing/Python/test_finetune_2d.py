"""One-slice (2D) images: fine-tuning gets a 2D U-Net, a 2D pretraining bundle initialises it, predict
writes a one-slice label map on the input's grid, and 2D/3D mismatches are refused in one line."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSSL.io.bundle import load_bundle, read_meta
from MedSSL.commands.cli import main
from MedSSL.transforms.augment import AugmentConfig, augment_batch
from MedSSL.tasks.finetune.classify import fit_to_patch
from MedSSL.data.labels import IGNORE
from MedSSL.io.volumes import write_volume
from finetune_helpers import OBLIQUE, blobs_ct, segment_bundle, volume

torch.set_num_threads(1)
TINY = ["--width", "8", "--lr", "3e-3", "--batch-size", "2", "--progress", "none", "--threads", "1", "--device", "cpu"]
SPACING, ORIGIN = (0.6, 0.8, 2.5), (10.0, -20.0, 30.0)


def disc(seed: int, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A noisy one-slice CT-like image (X, Y) with a bright disc and an equally bright bar (5 x 30 pixels,
    on the side of Y the disc leaves free), and the disc's label: an intensity threshold cannot tell them
    apart, the shape can."""
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[:n, :n]
    cx, cy = rng.uniform(15, n - 15, 2)
    mask = (x - cx) ** 2 + (y - cy) ** 2 <= rng.uniform(7, 10) ** 2
    bar = (x >= 9) & (x < 39) & ((y >= 38) & (y < 43) if cy < n / 2 else (y >= 5) & (y < 10))
    image = np.where(mask | bar, 400.0, 0.0) + rng.normal(0, 20, (n, n))
    return image.round().astype(np.int16), mask.astype(np.uint8)


def best_threshold_dice(image: np.ndarray, truth: np.ndarray) -> float:
    """The trivial baseline: the best Dice of ``image > t`` against ``truth`` over every threshold t."""
    return max(dice(image > t, truth == 1) for t in np.unique(image))


def write_2d(array: np.ndarray, path, spacing=SPACING, origin=ORIGIN, direction=None) -> None:
    """Write (X, Y) as a one-slice NIfTI volume (X, Y, 1) with SimpleITK."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T[None]))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection([float(d) for d in np.asarray(direction).reshape(-1)])
    sitk.WriteImage(image, str(path))


def dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def run_bad(argv, capsys, named, outputs=()):
    if argv[0] in ("finetune", "predict", "suggest") and "--device" not in argv:
        argv = [*argv, "--device", "cpu"]  # explicit: on a GPU machine the checks run on CPU as tuned
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medssl: error: "), err
    assert named in err[0], err[0]
    for path in outputs:
        assert not path.exists(), f"{path} was left behind"
    return err[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flat")
    for seed in range(4):
        image, label = disc(seed)
        direction = OBLIQUE if seed == 3 else None  # the test image sits on an oblique grid
        write_2d(image, d / f"img{seed}.nii.gz", direction=direction)
        write_2d(label, d / f"lab{seed}.nii.gz", direction=direction)
        painted = np.full_like(label, IGNORE)
        painted[label > 0] = 1
        painted[:6] = 0  # a stroke of background and the disc: the rest not annotated
        write_2d(painted, d / f"painted{seed}.nii.gz", direction=direction)
    image, labels = blobs_ct((16, 16, 8), seed=0)
    write_volume(volume(image), d / "vol.nii.gz")
    write_volume(volume(labels), d / "vol_lab.nii.gz")
    segment_bundle(d / "seg3d", width=4, patch=(16, 16, 8))
    return d


@pytest.fixture(scope="module")
def pretrained(files, tmp_path_factory):
    """A 2D Models Genesis bundle from `medssl pretrain` on the one-slice images."""
    out = tmp_path_factory.mktemp("pre") / "genesis2d"
    assert main(["pretrain", "--device", "cpu", "--method", "genesis", "--data", *(str(files / f"img{s}.nii.gz") for s in range(3)),
                 "--out", str(out), "--patch", "32", "32", "1", "--steps", "2", "--batch-size", "2", "--width", "4",
                 "--cache", str(out.parent / "cache"), "--progress", "none", "--seed", "5"]) == 0
    assert read_meta(out)["architecture"]["spatial_dims"] == 2
    return out


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """A 2D segmentation bundle trained from scratch on two disc images."""
    out = tmp_path_factory.mktemp("seg") / "m"
    assert main(["finetune", "--device", "cpu", "--image", str(files / "img0.nii.gz"), "--label", str(files / "lab0.nii.gz"),
                 "--image", str(files / "img1.nii.gz"), "--label", str(files / "lab1.nii.gz"), "--out", str(out),
                 "--steps", "80", "--modality", "CT", *TINY]) == 0
    return out


def test_finetune_on_one_slice_images_writes_a_2d_bundle(trained):
    meta, state = load_bundle(trained)
    assert meta["architecture"]["spatial_dims"] == 2 and meta["architecture"]["out_channels"] == 2
    assert meta["patch_size"] == [48, 48, 1]  # the automatic 2D patch, capped at the image size
    assert meta["inference"]["window"] == "plane"
    assert meta["init"] == {"source": "scratch"}
    assert meta["fewshot"]["annotation"] == "dense" and meta["fewshot"]["painted_axis"] is None
    assert state["down_tr64.ops.0.conv1.weight"].shape == (8, 1, 3, 3)  # 2D kernels


def test_predict_writes_a_one_slice_label_map_on_the_input_grid(files, trained, tmp_path):
    image = files / "img3.nii.gz"  # unseen, on an oblique grid
    out, det, prob = tmp_path / "pred.nii.gz", tmp_path / "det.json", tmp_path / "prob.nrrd"
    assert main(["predict", "--device", "cpu", "--model", str(trained), "--image", str(image), "--out", str(out), "--detections", str(det),
                 "--probabilities", str(prob), "--progress", "none"]) == 0
    ref, pred = sitk.ReadImage(str(image)), sitk.ReadImage(str(out))
    assert pred.GetSize() == ref.GetSize() == (48, 48, 1)
    assert np.allclose(pred.GetSpacing(), ref.GetSpacing()) and np.allclose(pred.GetOrigin(), ref.GetOrigin())
    assert np.allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert sitk.ReadImage(str(prob)).GetSize() == (48, 48, 1)
    image3, truth = disc(3)
    labels = sitk.GetArrayFromImage(pred)[0].T
    # the bar as bright as the disc: the best threshold scores 0.788 on this image (0.790 on img2); the network
    # (width 8, 80 steps) 0.960 with the default --seed 0, 0.984-1.0 with --seed 1-4 (measured 2026-12-07)
    baseline = best_threshold_dice(image3, truth)
    assert dice(labels == 1, truth == 1) > baseline + 0.1, (dice(labels == 1, truth == 1), baseline)
    found = json.loads(det.read_text(encoding="utf-8"))
    assert found and found[0]["label"] == 1 and found[0]["area_mm2"] == pytest.approx(found[0]["voxels"] * 0.6 * 0.8, rel=1e-3)
    # --annotation: the painted pixels are copied, components away from the painting dropped
    cleaned = tmp_path / "clean.nii.gz"
    assert main(["predict", "--device", "cpu", "--model", str(trained), "--image", str(image), "--out", str(cleaned),
                 "--annotation", str(files / "painted3.nii.gz"), "--window", "16", "16", "--tta", "--progress", "none"]) == 0
    clean = sitk.GetArrayFromImage(sitk.ReadImage(str(cleaned)))[0].T
    assert (clean[:6] == 0).all() and dice(clean == 1, truth == 1) > baseline + 0.1


def test_2d_pretraining_bundle_initialises_finetune(files, pretrained, tmp_path):
    _, pre_state = load_bundle(pretrained)
    backbone = {k[len("backbone."):]: v for k, v in pre_state.items() if k.startswith("backbone.")}
    out = tmp_path / "ft"
    assert main(["finetune", "--device", "cpu", "--image", str(files / "img0.nii.gz"), "--label", str(files / "lab0.nii.gz"), "--out", str(out),
                 "--init", str(pretrained), "--steps", "1", "--lr", "1e-12", "--bn-recalibration", "0",
                 "--patch", "32", "32", "--progress", "none", "--threads", "1"]) == 0
    meta, state = load_bundle(out)
    assert meta["architecture"] == {"name": "unet3d", "width": 4, "in_channels": 1, "out_channels": 2, "spatial_dims": 2}
    assert meta["init"] == {"source": "bundle", "width": 4, "spatial_dims": 2, "method": "genesis", "task": "pretrain"}
    assert meta["patch_size"] == [32, 32, 1]
    encoder = [k for k in state if k.startswith("down_tr") and k.endswith("weight")]
    assert len(encoder) == 16
    for key in encoder:
        assert torch.allclose(state[key], backbone[key], atol=1e-6), key
    dec = "up_tr64.ops.0.conv1.weight"
    assert torch.allclose(state[dec], backbone[dec], atol=1e-6)  # decoder too (--transfer all)
    # the fine-tuned 2D bundle itself initialises a further fine-tuning (and classification)
    csv = tmp_path / "cls.csv"
    csv.write_text("image,label\n" + "".join(f"{files / f'img{s}.nii.gz'},{s % 2}\n" for s in range(4)), encoding="utf-8")
    assert main(["finetune", "--device", "cpu", "--task", "classify", "--csv", str(csv), "--out", str(tmp_path / "cls"), "--init", str(out),
                 "--steps", "2", "--patch", "32", "32", "1", "--progress", "none", "--threads", "1"]) == 0
    cls_meta, cls_state = load_bundle(tmp_path / "cls")
    assert cls_meta["architecture"]["spatial_dims"] == 2 and cls_meta["patch_size"] == [32, 32, 1]
    assert cls_state["backbone.down_tr64.ops.0.conv1.weight"].shape == (4, 1, 3, 3)
    pred = tmp_path / "cls.json"
    assert main(["predict", "--device", "cpu", "--model", str(tmp_path / "cls"), "--image", str(files / "img2.nii.gz"), "--out", str(pred),
                 "--tta", "--progress", "none"]) == 0
    result = json.loads(pred.read_text(encoding="utf-8"))
    assert set(result["probabilities"]) == {"class_0", "class_1"} and result["label"] in (0, 1)


def test_2d_and_3d_mismatches_are_refused(files, pretrained, trained, tmp_path, capsys):
    out = tmp_path / "out"
    flat = ["--image", str(files / "img0.nii.gz"), "--label", str(files / "lab0.nii.gz")]
    vol = ["--image", str(files / "vol.nii.gz"), "--label", str(files / "vol_lab.nii.gz")]
    base = ["finetune", "--out", str(out), "--steps", "1", "--width", "4", "--progress", "none"]
    # a 3D model for one-slice images, a 2D model for volumes
    msg = run_bad([*base, *flat, "--init", str(files / "seg3d")], capsys, str(files / "seg3d"), [out])
    assert "3D model" in msg and "one-slice" in msg
    msg = run_bad([*base, *vol, "--init", str(pretrained), "--patch", "16", "16", "8"], capsys, str(pretrained), [out])
    assert "2D model" in msg and "3D volumes" in msg
    # one-slice images mixed with volumes (either order), named
    msg = run_bad([*base, *flat, *vol], capsys, "vol.nii.gz", [out])
    assert "3D volume" in msg
    run_bad([*base, *vol, *flat, "--patch", "16", "16", "8"], capsys, "img0.nii.gz", [out])
    # 2D patches: X Y or X Y 1, multiples of 8; Z = 1 is not a 3D patch
    run_bad([*base, *flat, "--patch", "12", "16"], capsys, "--patch 12 16", [out])
    run_bad([*base, *vol, "--patch", "16", "16", "1"], capsys, "--patch 16 16 1", [out])
    run_bad([*base, *vol, "--patch", "16", "16"], capsys, "--patch 16 16", [out])
    # classification: a 3D init for one-slice images
    csv = tmp_path / "c.csv"
    csv.write_text(f"{files / 'img0.nii.gz'},a\n{files / 'img1.nii.gz'},b\n", encoding="utf-8")
    run_bad(["finetune", "--task", "classify", "--csv", str(csv), "--out", str(out), "--init", str(files / "seg3d"),
             "--steps", "1", "--progress", "none"], capsys, str(files / "seg3d"), [out])
    # prediction: 2D model on a volume, 3D model on a one-slice image; suggest has no slice to rank
    pred = tmp_path / "p.nii.gz"
    msg = run_bad(["predict", "--model", str(trained), "--image", str(files / "vol.nii.gz"), "--out", str(pred)],
                  capsys, "vol.nii.gz", [pred])
    assert "2D" in msg
    msg = run_bad(["predict", "--model", str(files / "seg3d"), "--image", str(files / "img0.nii.gz"), "--out", str(pred)],
                  capsys, "img0.nii.gz", [pred])
    assert "3D" in msg
    run_bad(["predict", "--model", str(trained), "--image", str(files / "img0.nii.gz"), "--out", str(pred),
             "--window", "12", "16"], capsys, "--window 12 16", [pred])
    msg = run_bad(["suggest", "--model", str(trained), "--image", str(files / "img0.nii.gz")], capsys, str(trained))
    assert "2D" in msg


def test_2d_augmentation_and_resize_keep_shapes_and_alignment():
    torch.manual_seed(0)
    target = (torch.rand(3, 16, 24) > 0.5).long()
    image = target[:, None].float()
    plain = AugmentConfig(p_affine=0.0, flip_axes=(0, 1), contrast=(1.0, 1.0), brightness=0.0, gamma=(1.0, 1.0),
                          noise_std=0.0)
    x, y = augment_batch(image, target, plain, torch.Generator().manual_seed(1))
    assert x.shape == (3, 1, 16, 24) and y.shape == (3, 16, 24)
    assert torch.equal(x[:, 0], y.float())  # flips move image and target together
    warp = AugmentConfig(p_affine=1.0, flip_axes=(), contrast=(1.0, 1.0), brightness=0.0, gamma=(1.0, 1.0), noise_std=0.0)
    x, y = augment_batch(image, target, warp, torch.Generator().manual_seed(2))
    assert x.shape == (3, 1, 16, 24) and y.shape == (3, 16, 24)
    assert ((y == 0) | (y == 1) | (y == IGNORE)).all() and (y == IGNORE).any()  # pulled in from outside: not annotated
    assert fit_to_patch(np.zeros((50, 30, 1), np.float32), (32, 16, 1)).shape == (1, 32, 16)
