"""medssl finetune (segmentation): learning from painted slices, the ignore label, label values, class
names, initialisation, the time budget and the bundle's model.json."""

import json

import numpy as np
import pytest
import torch

from MedSSL.io.bundle import read_meta, save_bundle
from MedSSL.commands.cli import main
from MedSSL.data.phantom import make_phantom
from MedSSL.data.labels import IGNORE, LabelMapping, annotation_summary, parse_classes, sidecar_path
from MedSSL.losses.segmentation import MaskedDiceCELoss
from MedSSL.data.sampling import PatchSampler, TrainingVolume, auto_patch
from MedSSL.tasks.infer.model import load_model
from MedSSL.tasks.infer.predict import PredictOptions, segment
from MedSSL.io.volumes import read_volume, write_volume
from MedSSL.models.genesis_unet import GenesisUNet
from finetune_helpers import blobs_ct, volume
from medssl_testing import StepClock, published_genesis_checkpoint, record_initial_state
from MedSSL.engine import loop as loop_module
from MedSSL.engine.loop import TrainingLoop
from MedSSL.tasks.finetune import common as finetune_common

torch.set_num_threads(1)
TINY = ["--width", "8", "--lr", "3e-3", "--batch-size", "2", "--device", "cpu", "--progress", "none", "--threads", "1"]


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def finetune(image, label, out, *extra):
    """The network path (``--engine network``): these tests are about U-Net fine-tuning; a painting would
    otherwise go to the few-shot engine, tested in test_fewshot.py."""
    return main(["finetune", "--device", "cpu", "--image", str(image), "--label", str(label), "--out", str(out), "--engine", "network",
                 *TINY, *extra])


# ----- the loss ignores 255 --------------------------------------------------------------------------


def test_ignored_voxels_change_neither_loss_nor_gradient():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8, 8))
    target[:, 4:] = IGNORE
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    loss, _ = MaskedDiceCELoss()(logits, target)
    loss.backward()
    assert logits.grad[:, :, 4:].abs().max() == 0  # no gradient reaches an ignored voxel
    assert logits.grad[:, :, :4].abs().max() > 0
    other = logits.detach().clone()
    other[:, :, 4:] = torch.randn(2, 3, 4, 8, 8) * 10  # anything at all where nothing is annotated
    again, _ = MaskedDiceCELoss()(other, target)
    assert torch.allclose(loss, again)
    # and it is not the loss of treating 255 as background
    as_background = torch.where(target == IGNORE, 0, target)
    assert not torch.allclose(loss, MaskedDiceCELoss()(logits.detach(), as_background)[0])


@pytest.mark.parametrize("classes,channels_last", [(3, False), (7, True)])
def test_masked_dice_is_monais_dice_on_masked_one_hot_targets(classes, channels_last):
    """The hand-written Dice (no one-hot tensor) gives MONAI's DiceLoss value and gradient."""
    import torch.nn.functional as F
    from monai.losses import DiceLoss

    from MedSSL.losses.segmentation import masked_dice_loss

    torch.manual_seed(classes)
    logits = torch.randn(2, classes, 8, 6, 4)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last_3d)
    target = torch.randint(0, classes - 1, (2, 8, 6, 4))  # the last class is absent: its term is 0/0-smoothed
    target[0, :3] = IGNORE
    mask = target != IGNORE
    grads = []
    for hand_written in (True, False):
        x = logits.clone().requires_grad_()
        probs = torch.softmax(x, dim=1)
        if hand_written:
            loss = masked_dice_loss(probs, target, mask)
        else:
            m = mask.unsqueeze(1).float()
            onehot = F.one_hot(torch.where(mask, target, 0), classes).movedim(-1, 1).float()
            loss = DiceLoss(include_background=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)(probs * m, onehot * m)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_dice_can_leave_out_the_classes_absent_from_the_batch():
    """skip_absent: the Dice term is the mean over the annotated classes only; an absent class then pulls
    its probability down through the cross-entropy alone (no Dice term of about 1 for it)."""
    from MedSSL.losses.segmentation import masked_dice_loss

    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(2, 5, 8, 6, 4), dim=1)
    target = torch.randint(0, 3, (2, 8, 6, 4))  # classes 3 and 4 absent
    target[1, :2] = IGNORE
    mask = target != IGNORE
    every = masked_dice_loss(probs, target, mask)
    present = masked_dice_loss(probs, target, mask, skip_absent=True)
    assert float(present) == pytest.approx(np.mean([
        1 - 2 * float(probs[:, c][mask & (target == c)].sum()) / (float(probs[:, c][mask].sum()) + float((target[mask] == c).sum()))
        for c in range(3)]), abs=1e-5)
    assert float(every) > float(present)  # with the absent classes' terms of about 1
    logits = torch.randn(2, 5, 8, 6, 4, requires_grad=True)
    loss, _ = MaskedDiceCELoss(skip_absent=True)(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_loss_is_the_same_for_channels_last_logits():
    """The CPU training network is channels-last; the loss must not depend on the memory layout."""
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 8, 6, 4)
    target = torch.randint(0, 5, (2, 8, 6, 4))
    target[1, :, :2] = IGNORE
    results = []
    for x in (logits.clone(), logits.contiguous(memory_format=torch.channels_last_3d)):
        x.requires_grad_()
        loss, parts = MaskedDiceCELoss()(x, target)
        loss.backward()
        results.append((loss.detach(), x.grad, parts))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7)
    import torch.nn.functional as F

    assert abs(results[0][2]["ce"] - float(F.cross_entropy(logits, target, ignore_index=IGNORE))) < 1e-5


def test_training_on_annotated_ends_does_not_learn_the_unannotated_middle(tmp_path):
    """Bright blobs everywhere; only both ends of X are annotated (blob = 1, the rest 0), the middle
    60 % is 255. Were 255 taken as background (or as a class), the blobs in the middle would be
    learned as not-1."""
    image, labels = blobs_ct((32, 32, 16), seed=3, n=8, radius=4)
    sparse = np.full_like(labels, IGNORE)
    sparse[:7], sparse[-6:] = labels[:7], labels[-6:]
    hidden = np.s_[7:-6]
    assert labels[:7].any() and labels[hidden].sum() > 3 * labels[:7].sum()
    write_volume(volume(image), tmp_path / "img.nii.gz")
    write_volume(volume(sparse), tmp_path / "lab.nii.gz")
    assert finetune(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", tmp_path / "m", "--steps", "100",
                    "--patch", "16", "16", "16", "--no-augment") == 0
    meta = read_meta(tmp_path / "m")
    assert meta["architecture"]["out_channels"] == 2 and meta["channels"] == [0, 1]
    pred = segment(load_model(tmp_path / "m", torch.device("cpu")), volume(image), "img", PredictOptions()).labels.array
    assert dice(pred[hidden] == 1, labels[hidden] == 1) > 0.7


# ----- learning from painted slices ----------------------------------------------------------------


def best_window_dice(image: np.ndarray, target: np.ndarray) -> float:
    """The trivial baseline: the best Dice of a plain intensity window [lo, hi] (HU, steps of 20) against
    ``target`` (the phantom's organs are intensity bands, so a window is a strong baseline)."""
    values = np.arange(-1000, 1001, 20)
    return max(dice((image >= lo) & (image < hi), target) for i, lo in enumerate(values) for hi in values[i + 1:i + 40])


def test_phantom_painted_slices_generalise_to_unseen_slices(tmp_path):
    ph = make_phantom(0, shape=(48, 48, 32), spacing=(5.0, 5.0, 6.0))
    truth = np.zeros(ph.labels.shape, np.uint8)
    truth[ph.labels.array == 1] = 1  # liver
    truth[np.isin(ph.labels.array, (5, 6))] = 5  # lungs
    sparse = np.full_like(truth, IGNORE)
    sparse[:, :, ::4] = truth[:, :, ::4]  # every 4th axial slice painted
    write_volume(ph.image, tmp_path / "ct.nii.gz")
    write_volume(ph.image.with_array(sparse), tmp_path / "painted.nii.gz")
    # the network on the painted planes themselves (--no-completion; completed paintings: test_cohort.py)
    assert finetune(tmp_path / "ct.nii.gz", tmp_path / "painted.nii.gz", tmp_path / "m", "--steps", "100",
                    "--patch", "32", "32", "16", "--classes", "1=liver,5=lungs", "--no-completion") == 0
    meta = read_meta(tmp_path / "m")
    assert meta["fewshot"]["annotation"] == "slices" and meta["fewshot"]["postprocess"]["connected_to_annotation"]
    assert meta["data_summary"]["annotations"][0] == {"kind": "slices", "axis": 2, "slices": 8,
                                                      "fraction": meta["data_summary"]["annotations"][0]["fraction"]}
    pred = segment(load_model(tmp_path / "m", torch.device("cpu")), ph.image, "ct", PredictOptions()).labels.array
    unseen = np.ones(truth.shape[2], bool)
    unseen[::4] = False
    image = ph.image.array[:, :, unseen]
    for value in (5, 1):  # lungs, liver: better than the best plain intensity window (measured 0.80, 0.53)
        target = truth[:, :, unseen] == value
        window = best_window_dice(image, target)
        assert dice(pred[:, :, unseen] == value, target) > window, (value, dice(pred[:, :, unseen] == value, target), window)


# ----- label values and classes --------------------------------------------------------------------


def test_label_values_3_and_117_come_back_as_3_and_117(tmp_path):
    image, labels = blobs_ct((32, 32, 16), seed=1, n=6, radius=4, values=(3, 117), hu=(400, -500))
    write_volume(volume(image), tmp_path / "img.nrrd")
    write_volume(volume(labels), tmp_path / "lab.nrrd")
    assert finetune(tmp_path / "img.nrrd", tmp_path / "lab.nrrd", tmp_path / "m", "--steps", "100",
                    "--patch", "16", "16", "16", "--no-augment") == 0
    meta = read_meta(tmp_path / "m")
    assert meta["channels"] == [0, 3, 117] and set(meta["classes"]) == {"3", "117"}
    assert meta["classes"]["117"]["name"] == "label_117"
    assert main(["predict", "--device", "cpu", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "img.nrrd"),
                 "--out", str(tmp_path / "pred.nrrd"), "--progress", "none"]) == 0
    pred = read_volume(tmp_path / "pred.nrrd").array
    assert pred.dtype == np.uint8
    assert set(np.unique(pred)) <= {0, 3, 117} and {3, 117} <= set(np.unique(pred))
    assert dice(pred == 117, labels == 117) > 0.6 and dice(pred == 3, labels == 3) > 0.6


def test_class_names_from_list_json_and_sidecar(tmp_path):
    assert parse_classes("1=spleen, 2=liver") == {1: {"name": "spleen", "color": parse_classes("1=spleen")[1]["color"]},
                                                  2: {"name": "liver", "color": parse_classes("2=x")[2]["color"]}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"7": {"name": "aorta", "color": [1, 0, 0]}, "9": "vein"}), encoding="utf-8")
    classes = parse_classes(str(path))
    assert classes[7] == {"name": "aorta", "color": [1.0, 0.0, 0.0]} and classes[9]["name"] == "vein"
    assert sidecar_path(tmp_path / "label.nii.gz") == tmp_path / "label.classes.json"
    assert sidecar_path(tmp_path / "seg.nrrd") == tmp_path / "seg.classes.json"
    # the sidecar names the classes of a fine-tuned bundle
    image, labels = blobs_ct((16, 16, 16), seed=2, n=2, radius=3, values=(4,))
    write_volume(volume(image), tmp_path / "img.nii.gz")
    write_volume(volume(labels), tmp_path / "seg.nii.gz")
    (tmp_path / "seg.classes.json").write_text(json.dumps({"4": {"name": "kidney", "color": [0, 0.5, 1]}}), encoding="utf-8")
    assert finetune(tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "m", "--steps", "2",
                    "--patch", "16", "16", "16") == 0
    assert read_meta(tmp_path / "m")["classes"] == {"4": {"name": "kidney", "color": [0.0, 0.5, 1.0]}}


def test_mapping_annotation_summary_and_patch_choice():
    mapping = LabelMapping([3, 117])
    labels = np.array([0, 3, 117, 255, 3], np.uint8)
    assert mapping.to_channels(labels).tolist() == [0, 1, 2, 255, 1]
    assert mapping.channel_values()[mapping.to_channels(labels)[:3]].tolist() == [0, 3, 117]
    painted = np.full((10, 10, 20), IGNORE, np.uint8)
    painted[:, :, [3, 9, 15]] = 0
    assert annotation_summary(painted)["kind"] == "slices" and annotation_summary(painted)["slices"] == 3
    assert annotation_summary(np.zeros((10, 10, 20), np.uint8))["kind"] == "dense"
    assert auto_patch([[0.8, 0.8, 5.0]], [[164, 166, 26]]) == (64, 64, 16)
    assert auto_patch([[1.0, 1.0, 1.0]], [[200, 200, 200]]) == (64, 64, 32)
    assert auto_patch([[1.0, 1.0, 1.0]], [[20, 40, 12]]) == (24, 40, 16)


def test_sampler_balances_classes_and_keeps_painted_planes_inside():
    target = np.full((40, 40, 20), IGNORE, np.uint8)
    target[:, :, 10] = 0
    target[18:22, 18:22, 10] = 1  # 16 voxels of class 1 against 1584 of background
    image = np.random.default_rng(0).random((40, 40, 20)).astype(np.float32)
    sampler = PatchSampler([TrainingVolume(image, target)], (16, 16, 8), 2, np.random.default_rng(0))
    _, targets = sampler.sample(200)
    with_class = np.mean([(t == 1).any() for t in targets])
    assert 0.45 < with_class < 0.75
    assert all((t != IGNORE).any() for t in targets)  # every patch holds part of the painted plane


def test_sampler_draws_volumes_by_their_weights():
    """Self-training's round 2 weighs pseudo-labelled scans down: a volume of weight 3 gives about three times
    the patches of one of weight 1; equal weights draw exactly as unweighted volumes do."""
    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 8)).astype(np.float32)
    marked = [np.full((16, 16, 8), value, np.float32) for value in (0.25, 0.75)]  # tells the volumes apart
    target = np.zeros((16, 16, 8), np.uint8)
    target[6:10, 6:10, 3:5] = 1

    def patches(weights, seed=0):
        volumes = [TrainingVolume(m, target.copy(), weight=w) for m, w in zip(marked, weights)]
        images, _ = PatchSampler(volumes, (8, 8, 8), 2, np.random.default_rng(seed)).sample(400)
        return images[:, 0].max(axis=(1, 2, 3))  # 0.25 or 0.75 (outside the volume: 0)

    share = np.mean(patches((1.0, 3.0)) == np.float32(0.75))
    assert 0.68 < share < 0.82
    assert np.array_equal(patches((2.0, 2.0)), patches((1.0, 1.0)))
    unweighted = PatchSampler([TrainingVolume(m, target.copy()) for m in marked], (8, 8, 8), 2, np.random.default_rng(0))
    assert np.array_equal(unweighted.sample(400)[0][:, 0].max(axis=(1, 2, 3)), patches((1.0, 1.0)))


# ----- initialisation, budget, bundle --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    image, labels = blobs_ct((24, 24, 16), seed=5, n=3, radius=3)
    write_volume(volume(image, spacing=(1.5, 1.5, 3.0)), folder / "img.nii.gz")
    write_volume(volume(labels, spacing=(1.5, 1.5, 3.0)), folder / "lab.nii.gz")
    return folder


def test_init_from_pretraining_bundle_and_official_pt(small_case, tmp_path, monkeypatch):
    torch.manual_seed(123)  # not finetune's seed: a fresh network must differ from these weights
    backbone = GenesisUNet(1, 1, 4)
    save_bundle(tmp_path / "pre", {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                {"architecture": {"name": "unet3d", "width": 4, "in_channels": 1, "out_channels": 1}, "task": "pretrain",
                 "method": {"name": "genesis"}, "patch_size": [16, 16, 16],
                 "preprocessing": {"intensity": {"modality": "CT", "ct_window": [-500, 500], "mr_percentiles": [1, 99]},
                                   "target_spacing_mm": None, "modality": "CT"}})
    args = ["--steps", "1", "--patch", "16", "16", "16", "--bn-recalibration", "0", "--lr", "1e-12"]
    base = ["finetune", "--engine", "network", "--image", str(small_case / "img.nii.gz"), "--label", str(small_case / "lab.nii.gz"),
            "--batch-size", "2", "--progress", "none"]
    assert main([*base, "--out", str(tmp_path / "a"), "--init", str(tmp_path / "pre"), *args]) == 0
    meta = read_meta(tmp_path / "a")
    assert meta["init"] == {"source": "bundle", "width": 4, "method": "genesis", "task": "pretrain"}
    assert meta["architecture"]["width"] == 4  # taken from the init
    assert meta["preprocessing"]["intensity"]["ct_window"] == [-500.0, 500.0]  # pretraining's preprocessing
    from MedSSL.io.bundle import load_bundle

    _, state = load_bundle(tmp_path / "a")
    key = "down_tr64.ops.0.conv1.weight"
    assert torch.allclose(state[key], backbone.state_dict()[key], atol=1e-6)
    dec = "up_tr64.ops.0.conv1.weight"
    assert torch.allclose(state[dec], backbone.state_dict()[dec], atol=1e-6)  # decoder copied too (default)
    assert main([*base, "--out", str(tmp_path / "e"), "--init", str(tmp_path / "pre"), "--transfer", "encoder", *args]) == 0
    _, enc_only = load_bundle(tmp_path / "e")
    assert torch.allclose(enc_only[key], backbone.state_dict()[key], atol=1e-6)
    assert not torch.allclose(enc_only[dec], backbone.state_dict()[dec], atol=1e-3)
    assert read_meta(tmp_path / "e")["transfer"] == "encoder"
    # an official Models Genesis .pt (the release's key names and layout, width 4): the fine-tuned network
    # starts with every tensor of the file (weights and BatchNorm statistics), but the 1-channel output layer
    official = published_genesis_checkpoint(tmp_path / "g.pt", width=4, seed=9)
    seen = record_initial_state(monkeypatch)
    assert main([*base, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "g.pt"), *args]) == 0
    assert read_meta(tmp_path / "b")["init"] == {"source": "official-pt", "width": 4}
    copied = [key[len("module."):] for key in official if not key.startswith("module.out_tr.")]
    assert len(copied) == len(official) - 2 and set(copied) < set(seen)
    for key in copied:
        assert torch.equal(seen[key], official["module." + key].to(seen[key].dtype)), key
    assert seen["out_tr.final_conv.weight"].shape[0] == 2  # background + blob: the head is the network's own
    assert main([*base, "--out", str(tmp_path / "c"), "--init", "none", "--width", "4", *args]) == 0
    assert read_meta(tmp_path / "c")["init"] == {"source": "scratch"}


def test_max_time_alone_spreads_the_schedule_over_the_budget(small_case, tmp_path, monkeypatch):
    """--max-time alone: the step count is fitted to the budget and the run stops by time. The clock is a
    StepClock (1 s per read) in both the step fitting and the loop, so the counts do not depend on the
    machine: a timed step reads 1 s, so 40 steps are planned, and the loop's reads end it earlier."""
    clock = StepClock()
    monkeypatch.setattr(loop_module, "time", clock)
    monkeypatch.setattr(finetune_common, "time", clock)
    assert finetune(small_case / "img.nii.gz", small_case / "lab.nii.gz", tmp_path / "m", "--max-time", "40",
                    "--patch", "16", "16", "16") == 0
    meta = read_meta(tmp_path / "m")
    steps = meta["training"]["steps"]
    assert meta["training"]["stopped_by"] == "time" and 3 <= steps < 40, meta["training"]
    assert meta["history"][len(meta["history"]) // 2]["lr"] > 1e-4  # not a warm-up stretched over 10^9 steps
    text = json.dumps(meta)
    assert str(small_case) not in text and "img.nii.gz" not in text  # no input paths in the bundle


def test_progress_json_and_bundle_fields(small_case, tmp_path, capsys):
    assert main(["finetune", "--device", "cpu", "--engine", "network", "--image", str(small_case / "img.nii.gz"), "--label", str(small_case / "lab.nii.gz"),
                 "--out", str(tmp_path / "m"), "--width", "4", "--steps", "3", "--patch", "16", "16", "16",
                 "--detection", "--progress", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1] == {"event": "done", "bundle": str(tmp_path / "m")}
    assert any(line["event"] == "progress" and line["stage"] == "finetune" for line in lines)
    meta = read_meta(tmp_path / "m")
    assert meta["task"] == "segment" and meta["detection"] is True
    assert meta["architecture"]["width"] == 4 and meta["architecture"]["out_channels"] == 1 + len(meta["classes"])
    assert meta["patch_size"] == [16, 16, 16] and meta["init"] == {"source": "scratch"}
    assert meta["training"]["steps"] == 3 and meta["history"] and meta["history"][-1]["step"] == 3
    assert meta["preprocessing"]["modality"] == "CT" and meta["versions"]["torch"] == torch.__version__
    assert meta["fewshot"]["annotation"] in ("dense", "slices")
    assert meta["data_summary"]["spacings_mm"] == [[1.5, 1.5, 3.0]]


class Killed(Exception):
    """A run that dies (as a killed process would) right after writing a checkpoint."""


def test_resume_several_images_validation_and_spacing(small_case, tmp_path, monkeypatch):
    image, labels = blobs_ct((24, 24, 16), seed=6, n=3, radius=3)
    write_volume(volume(image, spacing=(1.5, 1.5, 3.0)), tmp_path / "img2.nii.gz")
    write_volume(volume(labels, spacing=(1.5, 1.5, 3.0)), tmp_path / "lab2.nii.gz")
    pairs = ["--image", str(small_case / "img.nii.gz"), "--label", str(small_case / "lab.nii.gz"),
             "--image", str(tmp_path / "img2.nii.gz"), "--label", str(tmp_path / "lab2.nii.gz")]
    base = ["finetune", *pairs, "--out", str(tmp_path / "m"), "--width", "4", "--patch", "16", "16", "8",
            "--val-fraction", "0.5", "--val-every", "2", "--checkpoint-every", "2", "--spacing", "2", "2", "3",
            "--device", "cpu", "--progress", "none"]
    whole = [a if a != str(tmp_path / "m") else str(tmp_path / "whole") for a in base]
    assert main([*whole, "--steps", "6"]) == 0  # the uninterrupted run, same seed
    with monkeypatch.context() as patch:  # the run dies right after its step-4 checkpoint
        real = TrainingLoop._checkpoint

        def _checkpoint(self):
            real(self)
            if self.step == 4:
                raise Killed("killed after step 4")

        patch.setattr(TrainingLoop, "_checkpoint", _checkpoint)
        with pytest.raises(Killed):
            main([*base, "--steps", "6"])
    assert torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert main([*base, "--steps", "6"]) == 2  # the folder holds a run: --resume or another --out
    assert main([*base, "--steps", "6", "--resume"]) == 0
    # resumed, it ends with the uninterrupted run's weights, Adam moments and losses (bit for bit on the CPU)
    ended, expected = (torch.load(folder / "checkpoint.pt", weights_only=True) for folder in (tmp_path / "m", tmp_path / "whole"))
    assert ended["step"] == expected["step"] == 6 and ended["model"].keys() == expected["model"].keys()
    assert all(torch.equal(ended["model"][k], expected["model"][k]) for k in expected["model"]), \
        [k for k in expected["model"] if not torch.equal(ended["model"][k], expected["model"][k])][:5]
    for a, b in zip(ended["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    meta = read_meta(tmp_path / "m")
    assert [r["loss"] for r in meta["history"]] == [r["loss"] for r in read_meta(tmp_path / "whole")["history"]]
    assert meta["training"]["steps"] == 6 and meta["training"]["best_val_loss"] is not None
    assert any("val_loss" in r for r in meta["history"])
    assert meta["preprocessing"]["target_spacing_mm"] == [2.0, 2.0, 3.0]
    assert meta["data_summary"]["volumes"] == 2 and meta["data_summary"]["spacings_mm"][0] == [2.0, 2.0, 3.0]
    assert main(["predict", "--device", "cpu", "--model", str(tmp_path / "m"), "--image", str(small_case / "img.nii.gz"), "--out",
                 str(tmp_path / "p.nii.gz"), "--progress", "none"]) == 0
    assert read_volume(tmp_path / "p.nii.gz").shape == (24, 24, 16)  # back on the input grid
