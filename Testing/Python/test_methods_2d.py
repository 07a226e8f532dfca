"""DiRA, CAiD and Ark in 2D (one-slice images such as radiographs): 2D views, queue, momentum teacher and
PatchGAN; Ark's 2D batches, heads, teacher and folded bundle; short runs on one-slice phantoms that lower
the loss and write bundles with ``spatial_dims`` 2; a spec mixing one-slice and 3D cases is refused."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medssl_testing import check_ark_teacher_update

from MedSSL.io.bundle import load_bundle
from MedSSL.commands.cli import main
from MedSSL.data.phantom import make_phantom
from MedSSL.io.volumes import Volume, write_volume
from MedSSL.transforms.views import random_resized_crop3d
from MedSSL.methods.base import build_method, method_class
from MedSSL.models.genesis_unet import GenesisUNet

torch.set_num_threads(1)
SIZE = (32, 32)
NO_PERTURBATION = {"view_local_rate": 0.0, "view_nonlinear_rate": 0.0, "view_paint_rate": 0.0}


def _images(n=4):
    """(n, 1, 32, 32) images with a distinct offset per sample and a smooth ramp inside (crops differ)."""
    x = torch.linspace(0, 0.2, SIZE[0]).view(1, 1, -1, 1) + torch.linspace(0, 0.1, SIZE[1]).view(1, 1, 1, -1)
    return (x + 0.15 * torch.arange(n).view(-1, 1, 1, 1)).expand(n, 1, *SIZE).contiguous()


def _method(name, **settings):
    return build_method(method_class(name), width=4, settings=settings, spatial_dims=2)


def _one_slice(volume, z):
    return Volume(volume.array[:, :, z:z + 1].copy(), volume.spacing, volume.origin, volume.direction)


# --------------------------------------------------------------------------------------------------
# DiRA and CAiD in 2D
# --------------------------------------------------------------------------------------------------


def test_2d_variants_are_declared_and_build_2d_networks():
    for name in ("dira", "caid", "ark"):
        cls = method_class(name)
        assert cls.supports_2d and "2D" in cls.published
        method = build_method(cls, width=4, spatial_dims=2)
        assert method.spatial_dims == 2 and method.backbone.spatial_dims == 2
        assert method.backbone.down_tr64.ops[0].conv1.weight.dim() == 4  # 2D kernels
    for name in ("semantic-genesis", "transvw"):
        with pytest.raises(ValueError):
            build_method(method_class(name), width=4, spatial_dims=2)


def test_2d_crop_and_views_are_2d_and_differ():
    x = _images()
    same = random_resized_crop3d(x, (1.0, 1.0), torch.Generator().manual_seed(0), aspect=1.0)
    assert same.shape == x.shape and torch.allclose(same, x, atol=1e-5)  # the whole image: itself
    crop = random_resized_crop3d(x, (0.3, 0.3), torch.Generator().manual_seed(0), aspect=1.0)
    # a sub-rectangle of 0.3 of the area: each side sqrt(0.3) of the image, so the ramp's range shrinks

    def span(t):
        return float(t[0, 0, -1, 0] - t[0, 0, 0, 0])

    assert span(crop) == pytest.approx(math.sqrt(0.3) * span(x), rel=0.1)
    method = _method("caid", **NO_PERTURBATION)
    view1, target1, view2 = method.make_views(x, torch.Generator().manual_seed(1))
    assert view1.shape == view2.shape == target1.shape == (4, 1, *SIZE)
    assert not torch.allclose(view1, view2)  # two different views
    assert torch.equal(view1, target1)  # without perturbations the view is its own target
    for i in range(x.shape[0]):  # view i stays within image i's range: same source
        lo, hi = float(x[i].min()) - 1e-5, float(x[i].max()) + 1e-5
        for v in (view1[i], view2[i]):
            assert lo <= float(v.min()) and float(v.max()) <= hi
    perturbed = _method("caid")
    v1, t1, _ = perturbed.make_views(x, torch.Generator().manual_seed(7))
    _, plain_t1, _ = method.make_views(x, torch.Generator().manual_seed(7))
    assert torch.equal(t1, plain_t1)  # the target is the crop behind view 1, whatever the perturbations
    assert not torch.equal(v1, t1)  # the Genesis perturbations change the input, not the target


def test_2d_queue_gets_one_unit_key_per_image_and_loss_weights():
    method = _method("caid", queue_size=6, embedding_dim=16)
    x = _images(4)
    loss, parts = method.training_loss(x, torch.Generator().manual_seed(0))
    assert method.queue.queue.shape == (6, 16)
    assert int(method.queue.ptr) == 4 and int(method.queue.filled) == 4
    assert torch.allclose(method.queue.queue[:4].norm(dim=1), torch.ones(4), atol=1e-5)
    assert float(loss.detach()) == pytest.approx(1.0 * parts["nce"] + 10.0 * parts["mse"], rel=1e-5)
    method.training_loss(x, torch.Generator().manual_seed(1))
    assert int(method.queue.ptr) == 2 and int(method.queue.filled) == 6  # wrapped round
    _, bottleneck = method.backbone.forward_with_bottleneck(x)
    assert bottleneck.shape == (4, 64, 4, 4) and method.projection(bottleneck).shape == (4, 16)
    before = method.queue.queue.clone()
    method.eval()
    method.validation_loss(x, torch.Generator().manual_seed(2))
    assert torch.equal(method.queue.queue, before)  # validation does not enqueue


def test_2d_momentum_teacher_is_an_ema_of_the_student():
    m = 0.9
    method = _method("caid", momentum=m)
    x = _images()

    def both():
        student = [p for mod in (method.backbone.down_tr64, method.backbone.down_tr128, method.backbone.down_tr256,
                                 method.backbone.down_tr512, method.projection) for p in mod.parameters()]
        return [p.detach().clone() for p in method.teacher.parameters()], [p.detach().clone() for p in student]

    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    loss, _ = method.training_loss(x, torch.Generator().manual_seed(0))
    teacher, student = both()
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))  # copied at the first step
    assert method.teacher.stages[0].ops[0].conv1.weight.dim() == 4  # a 2D teacher
    opt.zero_grad()
    loss.backward()
    opt.step()
    t0, s1 = both()
    method.after_step(1, 10)
    t1, _ = both()
    for a, b, c in zip(t1, t0, s1):
        assert torch.allclose(a, m * b + (1 - m) * c, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(t1, t0))


def test_2d_dira_discriminator_and_adversarial_game():
    method = _method("dira", adversarial_warmup=0.0)
    d = method.discriminator
    assert isinstance(d.convs[0], torch.nn.Conv2d) and isinstance(d.out, torch.nn.Conv2d)
    out = d(torch.rand(2, 1, *SIZE))
    assert out.dim() == 4 and out.shape[:2] == (2, 1) and out.shape[2:] == (4, 4)  # a 2D patch map
    assert d(torch.rand(2, 1, 8, 8)).shape[2:] == (2, 2)  # small images keep >= 2 pixels per axis
    with pytest.raises(ValueError):
        d(torch.rand(2, 1, 8, 8, 8))
    keys_3d = set(method_class("dira")(width=4).discriminator.state_dict())
    assert set(d.state_dict()) == keys_3d  # same keys, 2D kernels
    x = _images()
    loss, parts = method.training_loss(x, torch.Generator().manual_seed(0))
    assert parts["adv_on"] == 1.0
    expected = 1.0 * parts["nce"] + 10.0 * parts["mse"] + 0.001 * parts["adv_g"] + 1.0 * parts["adv_d"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)

    def grads(settings):
        m = _method("dira", nce_weight=0.0, mse_weight=0.0, adversarial_warmup=0.0, **settings)
        loss, _ = m.training_loss(x, torch.Generator().manual_seed(3))
        loss.backward()
        return tuple(sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)
                     for mod in (m.backbone, m.discriminator))

    g_backbone, g_disc = grads({"adv_weight": 0.0, "discriminator_weight": 1.0})
    assert g_backbone == 0.0 and g_disc > 0.0
    g_backbone, g_disc = grads({"adv_weight": 1.0, "discriminator_weight": 0.0})
    assert g_backbone > 0.0 and g_disc == 0.0


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory):
    """Three one-slice phantom images (48 x 48 x 1)."""
    folder = tmp_path_factory.mktemp("radiographs")
    for seed in range(3):
        image = make_phantom(seed, shape=(48, 48, 8), spacing=(4.0, 4.0, 6.0)).image
        write_volume(_one_slice(image, 3), folder / f"x{seed}.nii.gz")
    return folder


@pytest.mark.parametrize("name,settings", [("caid", {}), ("dira", {"adversarial_warmup": 0.0})])
def test_2d_short_run_lowers_the_loss_and_writes_a_2d_bundle(name, settings, radiographs, tmp_path):
    out = tmp_path / "bundle"
    assert main(["pretrain", "--device", "cpu", "--data", str(radiographs), "--method", name, "--method-settings", json.dumps(settings),
                 "--out", str(out), "--width", "4", "--patch", "32", "32", "8", "--steps", "40", "--batch-size", "8",
                 "--lr", "2e-3", "--progress", "none", "--cache", str(tmp_path / "cache"), "--seed", "0"]) == 0
    meta, state = load_bundle(out)
    assert meta["method"]["name"] == name and meta["task"] == "pretrain"
    assert meta["architecture"]["spatial_dims"] == 2 and meta["patch_size"] == [32, 32, 1]
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    GenesisUNet(1, 1, 4, spatial_dims=2).load_state_dict(backbone, strict=True)  # 2D kernels, the usual keys
    if name == "dira":
        assert state["discriminator.convs.0.weight"].dim() == 4
        assert all(r["adv_on"] == 1.0 for r in meta["history"])
    mse = [r["mse"] for r in meta["history"]]
    assert len(mse) == 40
    # restoration MSE, mean of the first / last 8 steps (the InfoNCE against the queue rises while the queue
    # fills, see methods/contrastive_base.py); seeds 0-3: late / early 0.49-0.79 for both methods
    early, late = float(np.mean(mse[:8])), float(np.mean(mse[-8:]))
    assert late < 0.9 * early, (early, late)


def test_2d_pretraining_with_spacing_resamples_in_plane_only(radiographs, tmp_path):
    out = tmp_path / "bundle"
    assert main(["pretrain", "--device", "cpu", "--data", str(radiographs), "--method", "genesis", "--out", str(out), "--width", "4",
                 "--patch", "16", "16", "1", "--steps", "1", "--batch-size", "2", "--spacing", "8", "8", "2",
                 "--progress", "none", "--cache", str(tmp_path / "cache")]) == 0
    summary = load_bundle(out)[0]["data_summary"]
    assert summary["shapes"] == [[24, 24, 1]] * 3 and summary["spacings_mm"] == [[8.0, 8.0, 6.0]] * 3


# --------------------------------------------------------------------------------------------------
# Ark in 2D
# --------------------------------------------------------------------------------------------------


def _write_case(folder, name, seed, values):
    """The slice of a phantom where ``values`` cover most pixels, as a one-slice image and label (values -> 1)."""
    ph = make_phantom(seed, shape=(48, 48, 8), spacing=(4.0, 4.0, 6.0))
    z = int(np.argmax(np.isin(ph.labels.array, values).sum(axis=(0, 1))))
    write_volume(_one_slice(ph.image, z), folder / f"{name}_img.nii.gz")
    mask = ph.labels.with_array(np.isin(ph.labels.array, values).astype(np.uint8))
    write_volume(_one_slice(mask, z), folder / f"{name}_lab.nii.gz")
    return {"image": f"{name}_img.nii.gz", "label": f"{name}_lab.nii.gz"}


@pytest.fixture(scope="module")
def ark_2d(tmp_path_factory):
    """Two datasets of one-slice phantoms: one labels the liver, the other the lungs."""
    folder = tmp_path_factory.mktemp("ark2d")
    spec = {"datasets": [
        {"name": "liver-set", "classes": {"1": "liver"}, "cases": [_write_case(folder, f"l{s}", s, [1]) for s in range(2)]},
        {"name": "lung-set", "classes": {"1": "lung"}, "cases": [_write_case(folder, f"s{s}", 10 + s, [5, 6]) for s in range(2)]},
    ]}
    (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder, spec


def _ark_2d_in_process(folder, tmp_path, **settings):
    from MedSSL.data import labelled
    from MedSSL.data.cubes import CubeSettings
    from MedSSL.data.preprocess import IntensityConfig
    from MedSSL.methods.base import PretrainData

    spec = labelled.read_spec(folder / "spec.json")
    assert labelled.case_dimensions(spec) == (2, None)
    datasets = labelled.load_datasets(spec, IntensityConfig(), None, tmp_path / "cache", spatial_dims=2)
    assert all(c.image.shape[2] == 1 for d in datasets for c in d.cases)
    data = PretrainData(settings=CubeSettings(patch=(*SIZE, 1)), datasets={"datasets": datasets})
    method = _method("ark", **settings)
    method.setup(data)
    return method, data


def test_ark_2d_batches_heads_teacher_and_bundle(ark_2d, tmp_path):
    folder, _ = ark_2d
    method, data = _ark_2d_in_process(folder, tmp_path)
    assert len(method.heads) == 2 and all(isinstance(h, torch.nn.Conv2d) and h.out_channels == 2 for h in method.heads)
    next_batch = method.batch_source(data, 3, np.random.default_rng(0), torch.device("cpu"))
    batches = [next_batch() for _ in range(4)]
    assert [b["dataset"] for b in batches] == [0, 1, 0, 1]
    for b in batches:
        assert b["image"].shape == (3, 1, *SIZE) and b["target"].shape == (3, *SIZE)
        assert set(torch.unique(b["target"]).tolist()) <= {0, 1, 255}
    image, target = method.augment(batches[0]["image"], batches[0]["target"], torch.Generator().manual_seed(0))
    assert image.shape == (3, 1, *SIZE) and target.shape == (3, *SIZE)
    check_ark_teacher_update(method, batches[0], batches[1])  # copy at step 0, then an EMA; c schedule
    # the bundle: a plain 2D U-Net of 1 + 2 outputs whose output layer is the folded teacher heads
    net = GenesisUNet(1, 3, 4, spatial_dims=2)
    net.load_state_dict(method.transferable_state_dict(), strict=True)
    net.eval()
    method.eval()
    with torch.no_grad():
        x = batches[0]["image"]
        backbone, _ = method.exported()
        feats = method.features(backbone, x)
        fused = net(x)
        w, b = method.folded()
        assert torch.allclose(fused, F.conv2d(feats, w[:, :, None, None], b), atol=1e-5)


def test_ark_2d_short_run_lowers_the_task_loss_and_writes_a_2d_bundle(ark_2d, tmp_path):
    folder, _ = ark_2d
    out = tmp_path / "ark"
    assert main(["pretrain", "--device", "cpu", "--method", "ark", "--datasets", str(folder / "spec.json"), "--out", str(out),
                 "--steps", "40", "--batch-size", "4", "--lr", "3e-3", "--cache", str(tmp_path / "cache"), "--seed", "0",
                 "--width", "4", "--patch", "32", "32", "8", "--progress", "none"]) == 0
    meta, state = load_bundle(out)
    assert meta["task"] == "segment" and meta["method"]["name"] == "ark"
    assert meta["architecture"]["spatial_dims"] == 2 and meta["architecture"]["out_channels"] == 3
    assert meta["patch_size"] == [32, 32, 1]
    assert {k: v["name"] for k, v in meta["classes"].items()} == {"1": "liver", "2": "lung"}
    GenesisUNet(1, 3, 4, spatial_dims=2).load_state_dict(state, strict=True)
    history = meta["history"]
    assert [r["dataset"] for r in history[:4]] == [0.0, 1.0, 0.0, 1.0]
    task = [r["task"] for r in history]
    # Dice + CE, mean of the first / last 8 steps; seeds 0-3: late / early 0.71-0.79
    early, late = float(np.mean(task[:8])), float(np.mean(task[-8:]))
    assert late < 0.9 * early, (early, late)
    text = (out / "model.json").read_text(encoding="utf-8")
    assert str(folder) not in text and "l0_img" not in text


def test_ark_2d_spec_mixing_a_3d_case_is_refused(ark_2d, tmp_path, capsys):
    folder, spec = ark_2d
    ph = make_phantom(5, shape=(32, 32, 8), spacing=(6.0, 6.0, 8.0))
    write_volume(ph.image, tmp_path / "vol_img.nii.gz")
    write_volume(ph.labels.with_array((ph.labels.array == 1).astype(np.uint8)), tmp_path / "vol_lab.nii.gz")
    bad = json.loads(json.dumps(spec))
    for case in (c for d in bad["datasets"] for c in d["cases"]):
        for key in ("image", "label"):
            case[key] = str(folder / case[key])
    bad["datasets"][0]["cases"].append({"image": str(tmp_path / "vol_img.nii.gz"), "label": str(tmp_path / "vol_lab.nii.gz")})
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(bad), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["pretrain", "--device", "cpu", "--method", "ark", "--datasets", str(path), "--out", str(out), "--steps", "1",
                 "--cache", str(tmp_path / "cache"), "--width", "4", "--patch", "32", "32", "8", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medssl: error: ") and str(path) in err[0], err
    assert "one-slice" in err[0] and "3D" in err[0] and "vol_img.nii.gz" in err[0], err[0]
    assert not (out / "model.json").exists()


def test_ark_2d_cases_resample_in_plane_validate_and_are_refused_by_a_3d_load(ark_2d, tmp_path):
    from MedSSL.data import labelled
    from MedSSL.data.cubes import CubeSettings
    from MedSSL.data.preprocess import IntensityConfig
    from MedSSL.errors import MedSSLError
    from MedSSL.methods.base import PretrainData

    folder, _ = ark_2d
    spec = labelled.read_spec(folder / "spec.json")
    datasets = labelled.load_datasets(spec, IntensityConfig(), (3.0, 3.0, 3.0), tmp_path / "cache", spatial_dims=2,
                                      val_fraction=0.5)
    case = datasets[0].cases[0]
    assert case.image.shape == case.label.shape == (64, 64, 1) and case.info["spacing_mm"] == [3.0, 3.0, 6.0]
    assert all(len(d.cases) == 1 and len(d.val_cases) == 1 for d in datasets)
    data = PretrainData(settings=CubeSettings(patch=(*SIZE, 1)), datasets={"datasets": datasets})
    method = _method("ark")
    method.setup(data)
    batches = method.validation_batches(data, 2, torch.device("cpu"), limit=2)
    assert [b["dataset"] for b in batches] == [0, 1] and batches[0]["image"].shape == (2, 1, *SIZE)
    assert math.isfinite(method.validation_loss(batches[0], torch.Generator().manual_seed(0)))
    with pytest.raises(MedSSLError, match="one-slice"):  # cached by the 2D load, still refused in 3D
        labelled.load_datasets(spec, IntensityConfig(), (3.0, 3.0, 3.0), tmp_path / "cache", spatial_dims=3)
