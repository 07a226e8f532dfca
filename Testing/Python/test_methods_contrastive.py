"""DiRA and CAiD: views, restoration targets, the MoCo queue and momentum teacher, loss weights, the
one-optimiser adversarial game, the warm-up, and short runs on phantoms."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedSSL.commands.cli import main
from MedSSL.losses.contrastive import info_nce
from MedSSL.models.momentum import FeatureQueue
from MedSSL.transforms.views import random_resized_crop3d
from MedSSL.errors import MedSSLError
from MedSSL.methods.base import available_methods, method_class
from MedSSL.methods.settings import from_json, to_json
from MedSSL.models.initial_weights import apply_initial_weights, load_initial_weights
from MedSSL.models.genesis_unet import GenesisUNet

torch.set_num_threads(1)
PATCH = (16, 16, 8)
NO_PERTURBATION = {"view_local_rate": 0.0, "view_nonlinear_rate": 0.0, "view_paint_rate": 0.0}


def _gradient_cubes(n=4):
    """Cubes with a distinct offset per sample and a smooth ramp inside (so crops differ)."""
    x = torch.linspace(0, 0.2, PATCH[0]).view(1, 1, -1, 1, 1) + torch.linspace(0, 0.1, PATCH[1]).view(1, 1, 1, -1, 1)
    return (x + 0.15 * torch.arange(n).view(-1, 1, 1, 1, 1)).expand(n, 1, *PATCH).contiguous()


def test_the_four_methods_are_registered_with_texts():
    names = {m.name: m for m in available_methods()}
    for name in ("semantic-genesis", "transvw", "dira", "caid"):
        cls = names[name]
        assert cls.description and cls.published and cls.defaults
    assert names["dira"].defaults["adv_weight"] == 0.001
    assert names["caid"].defaults["mse_weight"] == 10.0 and names["caid"].defaults["nce_weight"] == 1.0
    assert names["caid"].defaults["temperature"] == 0.2 and names["caid"].defaults["momentum"] == 0.999
    assert "adv_weight" not in names["caid"].defaults


def test_every_method_has_frozen_settings_whose_json_round_trips():
    """Settings are frozen dataclasses; their flat JSON (``medssl methods --json``, model.json) reads back
    to the same settings, lists as lists."""
    for cls in available_methods():
        settings = from_json(cls.Settings, cls.defaults)
        assert settings == cls.Settings() and to_json(settings) == cls.defaults
        assert json.loads(json.dumps(cls.defaults)) == cls.defaults
        field = dataclasses.fields(settings)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(settings, field, None)


def test_view_settings_are_the_flat_view_keys_of_one_nested_transform():
    method = method_class("caid")(width=4, settings={"view_local_rate": 0.0, "crop_scale": [0.5, 1.0]})
    assert method.settings.view.local_rate == 0.0 and method.settings.view.paint_rate == 0.35
    assert method.settings.crop_scale == (0.5, 1.0)
    described = method.describe()
    assert described["view_local_rate"] == 0.0 and described["crop_scale"] == [0.5, 1.0]
    assert list(described)[1:] == list(method_class("caid").defaults)
    with pytest.raises(ValueError, match="view_nope"):
        method_class("caid")(width=4, settings={"view_nope": 1})
    with pytest.raises(MedSSLError, match="local_rate"):
        method_class("dira")(width=4, settings={"view_local_rate": 2.0})


def test_identity_crop_and_views_come_from_the_same_cube():
    g = torch.Generator().manual_seed(0)
    x = _gradient_cubes()
    same = random_resized_crop3d(x, (1.0, 1.0), g, aspect=1.0)
    assert torch.allclose(same, x, atol=1e-5)
    method = method_class("caid")(width=4, settings=NO_PERTURBATION)
    view1, target1, view2 = method.make_views(x, torch.Generator().manual_seed(1))
    assert view1.shape == view2.shape == target1.shape == x.shape
    assert not torch.allclose(view1, view2)  # two different views
    assert torch.equal(view1, target1)  # without perturbations the view is its own target
    for i in range(x.shape[0]):  # values of view i stay within cube i's range: same source
        lo, hi = float(x[i].min()) - 1e-5, float(x[i].max()) + 1e-5
        for v in (view1[i], view2[i]):
            assert lo <= float(v.min()) and float(v.max()) <= hi


def test_restoration_target_is_the_unperturbed_crop():
    x = _gradient_cubes()
    perturbed = method_class("caid")(width=4)
    plain = method_class("caid")(width=4, settings=NO_PERTURBATION)
    v1, t1, _ = perturbed.make_views(x, torch.Generator().manual_seed(7))
    p1, pt1, _ = plain.make_views(x, torch.Generator().manual_seed(7))
    assert torch.equal(t1, pt1) and torch.equal(pt1, p1)  # the target ignores the perturbations
    assert not torch.equal(v1, t1)  # the input does not
    perturbed.eval()
    with torch.no_grad():
        loss, parts = perturbed.training_loss(x, torch.Generator().manual_seed(7))
        mse = F.mse_loss(torch.sigmoid(perturbed.backbone(v1)), t1)
    assert parts["mse"] == pytest.approx(float(mse), rel=1e-5)
    assert float(loss) == pytest.approx(1.0 * parts["nce"] + 10.0 * parts["mse"], rel=1e-5)  # CAiD weights


def test_queue_is_fifo_with_a_wrapping_pointer():
    q = FeatureQueue(10, 4)
    keys = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(3)]
    q.enqueue(keys[0])
    assert int(q.ptr) == 4 and int(q.filled) == 4 and torch.equal(q.queue[:4], keys[0])
    q.enqueue(keys[1])
    assert int(q.ptr) == 8 and torch.equal(q.queue[4:8], keys[1])
    q.enqueue(keys[2])  # 2 at the end, 2 wrap round over the oldest keys
    assert int(q.ptr) == 2 and int(q.filled) == 10
    assert torch.equal(q.queue[8:10], keys[2][:2]) and torch.equal(q.queue[0:2], keys[2][2:])
    assert torch.equal(q.queue[2:4], keys[0][2:])  # the rest of the oldest batch survives
    big = F.normalize(torch.randn(13, 4), dim=1)
    q.enqueue(big)  # more than fits: only the newest 10, oldest first
    assert int(q.ptr) == 2 and set(map(tuple, q.queue.tolist())) == set(map(tuple, big[3:].tolist()))


def test_training_enqueues_one_key_per_cube_and_validation_does_not():
    method = method_class("caid")(width=4, settings={"queue_size": 6})
    x = _gradient_cubes(4)
    method.training_loss(x, torch.Generator().manual_seed(0))
    assert int(method.queue.ptr) == 4 and int(method.queue.filled) == 4
    method.training_loss(x, torch.Generator().manual_seed(1))
    assert int(method.queue.ptr) == 2 and int(method.queue.filled) == 6
    before = method.queue.queue.clone()
    method.eval()
    method.validation_loss(x, torch.Generator().manual_seed(2))
    assert int(method.queue.ptr) == 2 and torch.equal(method.queue.queue, before)


def _teacher_and_student(method):
    student = [p for m in (method.backbone.down_tr64, method.backbone.down_tr128, method.backbone.down_tr256,
                           method.backbone.down_tr512, method.projection) for p in m.parameters()]
    return [p.detach().clone() for p in method.teacher.parameters()], [p.detach().clone() for p in student]


def test_momentum_teacher_update_is_exact():
    m = 0.9
    method = method_class("caid")(width=4, settings={"momentum": m})
    with torch.no_grad():  # as if --init loaded weights after construction: the teacher must copy them
        for p in method.backbone.parameters():
            p.add_(0.01)
    x = _gradient_cubes()
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    loss, _ = method.training_loss(x, torch.Generator().manual_seed(0))
    teacher, student = _teacher_and_student(method)
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))  # copied at the first step
    assert not any(p.requires_grad for p in method.teacher.parameters())
    opt.zero_grad()
    loss.backward()
    opt.step()
    t0, s1 = _teacher_and_student(method)
    method.after_step(1, 10)
    t1, _ = _teacher_and_student(method)
    for a, b, c in zip(t1, t0, s1):
        assert torch.allclose(a, m * b + (1 - m) * c, rtol=0, atol=1e-6)  # float32 rounding
    assert any(not torch.equal(a, b) for a, b in zip(t1, t0))
    # a trainer that never calls after_step: the next step applies the pending update once, first
    loss, _ = method.training_loss(x, torch.Generator().manual_seed(1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    t1, s2 = _teacher_and_student(method)
    method.training_loss(x, torch.Generator().manual_seed(2))
    t2, _ = _teacher_and_student(method)
    for a, b, c in zip(t2, t1, s2):
        assert torch.allclose(a, m * b + (1 - m) * c, rtol=0, atol=1e-6)  # float32 rounding
    method.after_step(3, 10)
    t3, _ = _teacher_and_student(method)
    method.after_step(3, 10)  # a second call before the next step changes nothing more
    t3b, _ = _teacher_and_student(method)
    assert all(torch.equal(a, b) for a, b in zip(t3, t3b))


def test_info_nce():
    q = F.normalize(torch.randn(3, 8), dim=1)
    negatives = F.normalize(torch.randn(5, 8), dim=1)
    loss, acc = info_nce(q, q, negatives, 0.2)
    logits = torch.cat([(q * q).sum(1, keepdim=True), q @ negatives.t()], dim=1) / 0.2
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, torch.zeros(3, dtype=torch.long))), rel=1e-6)
    assert float(acc) == 1.0


def test_dira_weights_warmup_and_one_optimiser_adversarial_game():
    x = _gradient_cubes()
    method = method_class("dira")(width=4, settings={"adversarial_warmup": 0.5})
    _, parts = method.training_loss(x, torch.Generator().manual_seed(0))
    assert parts["adv_on"] == 0.0
    method.after_step(4, 10)
    _, parts = method.training_loss(x, torch.Generator().manual_seed(0))
    assert parts["adv_on"] == 0.0
    method.after_step(5, 10)
    loss, parts = method.training_loss(x, torch.Generator().manual_seed(0))
    assert parts["adv_on"] == 1.0
    expected = 1.0 * parts["nce"] + 10.0 * parts["mse"] + 0.001 * parts["adv_g"] + 1.0 * parts["adv_d"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)

    def grads(settings):
        m = method_class("dira")(width=4, settings={"nce_weight": 0.0, "mse_weight": 0.0, "adversarial_warmup": 0.0,
                                                    **settings})
        loss, _ = m.training_loss(x, torch.Generator().manual_seed(3))
        loss.backward()
        norm = lambda mod: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)  # noqa: E731
        return norm(m.backbone), norm(m.discriminator)

    g_backbone, g_disc = grads({"adv_weight": 0.0, "discriminator_weight": 1.0})
    assert g_backbone == 0.0 and g_disc > 0.0  # the discriminator loss moves D only
    g_backbone, g_disc = grads({"adv_weight": 1.0, "discriminator_weight": 0.0})
    assert g_backbone > 0.0 and g_disc == 0.0  # the generator's adversarial loss moves the U-Net only


def test_discriminator_handles_small_cubes():
    method = method_class("dira")(width=4)
    out = method.discriminator(torch.rand(2, 1, 8, 8, 8))
    assert out.shape[0] == 2 and out.shape[1] == 1 and min(out.shape[2:]) >= 1


@pytest.fixture(scope="module")
def phantoms(large_phantoms):
    return large_phantoms


@pytest.mark.parametrize("name,settings", [("caid", {}), ("dira", {"adversarial_warmup": 0.0})])
def test_short_run_lowers_the_restoration_loss_and_initialises_finetuning(name, settings, phantoms, tmp_path):
    out = tmp_path / "bundle"
    assert main(["pretrain", "--device", "cpu", "--data", str(phantoms), "--method", name, "--method-settings", json.dumps(settings),
                 "--out", str(out), "--width", "4", "--patch", "16", "16", "8", "--steps", "40", "--batch-size", "8", "--lr", "2e-3",
                 "--progress", "none", "--cache", str(tmp_path / "cache"), "--seed", "0"]) == 0
    meta = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert meta["method"]["name"] == name
    mse = [r["mse"] for r in meta["history"] if "mse" in r]
    assert len(mse) == 40
    # restoration MSE, averaged over 8 steps (one step's perturbations vary a lot); seeds 0-4 gave 0.52-0.81
    early, late = float(np.mean(mse[:8])), float(np.mean(mse[-8:]))
    assert late < 0.9 * early, (early, late)
    if name == "dira":
        assert all(r["adv_on"] == 1.0 for r in meta["history"])
    init = load_initial_weights(out)
    report = apply_initial_weights(GenesisUNet(out_channels=3, width=4), init)
    assert report["loaded"] > 0 and "out_tr.final_conv.weight" in report["skipped"]
