"""Semantic Genesis and TransVW: self-discovered pattern classes, perturbations, loss, and short runs."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MedSSL.commands.cli import main
from MedSSL.data.cubes import CubeSettings, prepare_cubes
from MedSSL.data.preprocess import IntensityConfig
from MedSSL.io.volumes import Volume, write_volume
from MedSSL.methods.self_discovery.discover import discover_patterns
from MedSSL.methods.settings import from_json
from MedSSL.methods.self_discovery.geometry import crop_box, nearest_neighbours
from MedSSL.methods.self_discovery.planning import plan_classes
from MedSSL.transforms.restoration import elastic_inplane, one_of_four
from MedSSL.methods.base import PretrainData, method_class
from MedSSL.models.initial_weights import apply_initial_weights, load_initial_weights
from MedSSL.models.genesis_unet import GenesisUNet

torch.set_num_threads(1)
PATCH = (16, 16, 8)
SMALL = {"ae_steps": 6, "feature_grid": [16, 16, 8], "ae_width": 4}


def _ramp_volume(shape, seed) -> Volume:
    """CT volume whose value encodes the normalised X position: HU for 0.3 + 0.6 * (x + 0.5) / X (all body)."""
    x = (np.arange(shape[0]) + 0.5) / shape[0]
    u01 = 0.3 + 0.6 * x[:, None, None] + 0.01 * np.random.default_rng(seed).random(shape)
    hu = (u01 * 2000.0 - 1000.0).astype(np.float32)
    return Volume(hu, np.ones(3), np.zeros(3), np.eye(3), "CT")


@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    """Five volumes of different sizes; cubes, split and PretrainData as the trainer builds them."""
    folder = tmp_path_factory.mktemp("ramps")
    shapes = [(40, 36, 20), (48, 48, 24), (32, 40, 16), (44, 32, 24), (36, 36, 20)]
    sources = []
    for i, shape in enumerate(shapes):
        path = folder / f"r{i}.nii.gz"
        write_volume(_ramp_volume(shape, i), path)
        sources.append(path)
    settings = CubeSettings(patch=PATCH, cubes_per_volume=4, intensity=IntensityConfig(modality="CT"))
    cache = folder / "cache"
    cubes = prepare_cubes(sources, settings, cache)
    train, val = cubes.split(0.2, seed=0)
    return {"sources": sources, "settings": settings, "cache": cache, "train": train, "val": val, "shapes": shapes}


def _data(ramps, logs):
    return PretrainData(train=ramps["train"], val=ramps["val"], sources=ramps["sources"], settings=ramps["settings"],
                        cache_dir=ramps["cache"], seed=3, log=logs.append)


def _settings(name, **extra):
    cls = method_class(name)
    return from_json(cls.Settings, {**cls.defaults, **SMALL, **extra})


def test_pattern_classes_share_normalised_coordinates_across_neighbours(ramps):
    logs = []
    s = _settings("semantic-genesis", classes=5, instances=3, val_instances=1)
    ps = discover_patterns(_data(ramps, logs), s, torch.device("cpu"))
    assert ps.info["classes_found"] == 5 and ps.info["instances"] == 3
    train = ps.indices(0)
    assert sorted(set(ps.labels[train].tolist())) == list(range(5))
    assert ps.cubes.shape[1:] == PATCH
    for c in range(5):
        rows = train[ps.labels[train] == c]
        assert len(rows) == 3  # K instances, one resolution
        assert len(set(ps.volume[rows].tolist())) == 3  # from 3 different volumes
        assert np.allclose(ps.centres[rows], ps.centres[rows[0]])  # the same normalised place
        cx = ps.centres[rows[0], 0]
        cubes, _ = ps.get(rows)
        # the ramp's value at the cube centre is the normalised X of the place, whatever the volume's size
        # (the centre voxels: the rest of the cube may be padding where the place is near an edge)
        centre_values = cubes[:, 7:9, 7:9, 3:5].mean(axis=(1, 2, 3))
        assert np.allclose(centre_values, 0.3 + 0.6 * cx + 0.005, atol=0.04), (centre_values, cx)
    val = ps.indices(1)
    assert len(val) == 5 and sorted(ps.labels[val].tolist()) == list(range(5))


def test_members_are_the_nearest_neighbours_in_feature_space(ramps):
    logs = []
    s = _settings("semantic-genesis", classes=4, instances=2, val_instances=0)
    ps = discover_patterns(_data(ramps, logs), s, torch.device("cpu"))
    n_train = ps.info["train_volumes"]
    feats = ps.features[:n_train]
    train = ps.indices(0)
    for c, ref in enumerate(ps.info["references"]):
        members = set(ps.volume[train][ps.labels[train] == c].tolist())
        assert members == set(nearest_neighbours(feats, feats[ref], 2).tolist())
        assert ref in members  # the reference is its own nearest neighbour


def test_nearest_neighbours_and_class_planning():
    feats = np.array([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.5]])
    assert nearest_neighbours(feats, feats[0], 3).tolist() == [0, 4, 2]
    masks = [np.ones((8, 8, 4), bool)] * 5
    rng = np.random.default_rng(0)
    classes = plan_classes(feats, masks, [(64, 64, 32)] * 5, (16, 16, 8), classes=7, instances=2, rng=rng,
                           min_distance=0.1)
    assert len(classes) == 7
    assert sorted({c.reference for c in classes[:5]}) == [0, 1, 2, 3, 4]  # every reference once before reuse
    for c in classes:
        assert c.train_members.tolist() == nearest_neighbours(feats, feats[c.reference], 2).tolist()
        assert np.all(c.centre >= 0.125 - 1e-9) and np.all(c.centre <= 0.875 + 1e-9)  # the cube fits
    centres = np.array([c.centre for c in classes])
    d = np.linalg.norm(centres[:, None] - centres[None], axis=2) + np.eye(len(classes))
    assert d.min() >= 0.1


def test_crop_box_pads_outside_the_volume():
    a = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2) + 1
    box = crop_box(a, (0.5, 0.5, 0.5), (8, 8, 4))
    assert box.shape == (8, 8, 4) and box.sum() == a.sum() and np.count_nonzero(box) == a.size


def test_one_volume_degrades_gracefully(ramps, tmp_path):
    logs = []
    one = ramps["train"].subset([0])
    data = PretrainData(train=one, val=one, sources=ramps["sources"][:1], settings=ramps["settings"],
                        cache_dir=tmp_path, seed=0, log=logs.append)
    method = method_class("semantic-genesis")(width=4, settings={**SMALL, "classes": 6})
    next_batch = method.batch_source(data, 4, np.random.default_rng(0), torch.device("cpu"))
    ps = method.patterns
    assert ps.info["classes_found"] == 6 and ps.info["instances"] == 1
    assert any("only one training volume" in m for m in logs)
    centres = ps.centres[ps.indices(0)]
    assert len({tuple(c) for c in centres}) == 6  # six different places of the one volume
    cubes, labels = next_batch()
    assert cubes.shape == (4, 1, *PATCH) and labels.dtype == torch.long
    assert len(method.validation_batches(data, 4, torch.device("cpu"))) >= 1  # falls back to training patterns


def test_cache_is_reused_and_multi_resolution_adds_crops(ramps):
    logs = []
    s = _settings("transvw", classes=3, instances=2, val_instances=0)
    assert s.resolutions == 3
    first = discover_patterns(_data(ramps, logs), s, torch.device("cpu"))
    logs.clear()
    again = discover_patterns(_data(ramps, logs), s, torch.device("cpu"))
    assert any("reusing" in m for m in logs)
    assert np.array_equal(first.labels, again.labels)
    train = again.indices(0)
    assert len(train) == 3 * 2 * 3
    assert sorted(set(again.resolution[train].tolist())) == [0, 1, 2]
    for c in range(3):  # every instance's three resolutions share the label and the place
        rows = train[again.labels[train] == c]
        assert len(rows) == 6 and np.allclose(again.centres[rows], again.centres[rows[0]])


def test_one_of_four_perturbs_exactly_once_and_elastic_keeps_slices():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 8, 8, 8, generator=g)
    out, choice = one_of_four(x, g)
    counts = torch.bincount(choice, minlength=4).tolist()
    assert all(30 <= c <= 70 for c in counts), counts
    shuffled = choice == 0  # local shuffling only moves values
    assert torch.equal(out[shuffled].flatten(1).sort(1).values, x[shuffled].flatten(1).sort(1).values)
    assert not torch.equal(out, x)
    only_shuffle, c2 = one_of_four(x[:5], g, probabilities=[1, 0, 0, 0])
    assert bool((c2 == 0).all())
    same_slices = torch.rand(3, 1, 16, 16, 1).expand(3, 1, 16, 16, 4).contiguous()
    warped = elastic_inplane(same_slices, g)
    assert torch.allclose(warped, warped[..., :1].expand_as(warped))  # one in-plane warp for every slice
    assert not torch.allclose(warped, same_slices)
    flat = torch.full((2, 1, 16, 16, 4), 0.3)
    assert torch.allclose(elastic_inplane(flat, g), flat)


def test_target_is_the_original_and_loss_weights():
    method = method_class("semantic-genesis")(width=4, settings={"classes": 5}).eval()
    head = method.clc_out
    assert head.conv1.in_channels == 64 and head.conv1.out_channels == 128 and head.fc1.out_features == 5
    cubes = torch.rand(3, 1, *PATCH)
    labels = torch.tensor([0, 3, 4])
    with torch.no_grad():
        loss, parts = method.training_loss((cubes, labels), torch.Generator().manual_seed(5))
        inputs = method.perturb(cubes, torch.Generator().manual_seed(5))
        logits, bottleneck = method.backbone.forward_with_bottleneck(inputs)
        mse = F.mse_loss(torch.sigmoid(logits), cubes)
        ce = F.cross_entropy(method.clc_out(bottleneck), labels)
    assert parts["mse"] == pytest.approx(float(mse), rel=1e-5)
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert float(loss) == pytest.approx(1.0 * float(mse) + 0.01 * float(ce), rel=1e-5)


@pytest.fixture(scope="module")
def phantoms(large_phantoms):
    return large_phantoms


@pytest.mark.parametrize("name", ["semantic-genesis", "transvw"])
def test_short_run_lowers_the_restoration_loss_and_initialises_finetuning(name, phantoms, tmp_path):
    out = tmp_path / "bundle"
    settings = json.dumps({**SMALL, "classes": 6})
    assert main(["pretrain", "--device", "cpu", "--data", str(phantoms), "--method", name, "--method-settings", settings, "--out", str(out),
                 "--width", "4", "--patch", "16", "16", "8", "--steps", "40", "--batch-size", "8", "--lr", "2e-3", "--progress", "none",
                 "--cache", str(tmp_path / "cache"), "--seed", "0"]) == 0
    meta = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert meta["method"]["name"] == name and meta["method"]["classes"] == 6
    assert meta["method"]["discovered"]["classes_found"] == 6
    mse = [r["mse"] for r in meta["history"] if "mse" in r]
    assert len(mse) == 40
    # restoration MSE, averaged over 8 steps (one step's perturbations vary a lot); seeds 0-4 gave 0.52-0.81
    early, late = float(np.mean(mse[:8])), float(np.mean(mse[-8:]))
    assert late < 0.9 * early, (early, late)
    init = load_initial_weights(out)
    report = apply_initial_weights(GenesisUNet(out_channels=3, width=4), init)
    assert report["loaded"] > 0 and "out_tr.final_conv.weight" in report["skipped"]
    assert not any(k.startswith("clc_out") for k in init.state_dict)
