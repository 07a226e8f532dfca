"""Models Genesis, the default method: the network sees the transformed cube, is scored against the
unperturbed one (flipped like its input), and a short run restores held-out cubes better than a
constant guess and than the untrained network."""

import numpy as np
import pytest
import torch
from torch import nn

from MedSSL.io.bundle import load_bundle
from MedSSL.commands.cli import main
from MedSSL.data.cubes import CubeSettings, prepare_cubes
from MedSSL.data.phantom import make_phantom
from MedSSL.io.volumes import write_volume
from MedSSL.methods.base import method_class
from MedSSL.transforms.genesis import GenesisTransformConfig, genesis_transform

torch.set_num_threads(1)
OFF = {"flip_rate": 0.0, "local_rate": 0.0, "nonlinear_rate": 0.0, "paint_rate": 0.0}


class Oracle(nn.Module):
    """Stands in for the U-Net: records its input and answers logit(``answer``), so the restoration loss
    is ~0 exactly when ``answer`` is the method's target."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.seen = None
        self.answer = None

    def forward(self, x):
        self.seen = x.detach().clone()
        answer = self.answer if self.answer is not None else torch.full_like(x, 0.5)
        return torch.logit(answer.clamp(1e-6, 1 - 1e-6)) + self.bias


def _cubes(n=6, seed=0, size=(16, 16, 8)):
    """Smooth ramps plus texture in [0, 1]: every Genesis transform visibly changes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(0.1, 0.7, size[0]).view(1, 1, -1, 1, 1) + torch.linspace(0, 0.2, size[1]).view(1, 1, 1, -1, 1)
    return (x + 0.1 * torch.rand(n, 1, *size, generator=g)).clamp(0, 1)


def _genesis(settings=None):
    method = method_class("genesis")(width=4, settings=settings)
    method.backbone = Oracle()
    return method


def test_the_target_is_the_unperturbed_cube():
    """With flips off the target is the batch itself: answering the batch scores 0, answering the
    (perturbed) input does not. Swapping input and target fails both assertions."""
    batch = _cubes()
    method = _genesis({"flip_rate": 0.0})
    method.backbone.answer = batch
    loss, parts = method.training_loss(batch, torch.Generator().manual_seed(3))
    assert float(loss.detach()) < 1e-8 and parts["mse"] == pytest.approx(float(loss.detach()))
    seen = method.backbone.seen
    method.backbone.answer = seen
    wrong, _ = method.training_loss(batch, torch.Generator().manual_seed(3))
    assert float(wrong.detach()) > 1e-3  # the input is not the target


def test_the_input_differs_from_the_target_by_the_configured_transformations():
    batch = _cubes()
    config = GenesisTransformConfig()
    method = _genesis()
    method.training_loss(batch, torch.Generator().manual_seed(5))
    expected_input, expected_target = genesis_transform(batch, config, torch.Generator().manual_seed(5))
    assert torch.equal(method.backbone.seen, expected_input)
    # default rates (paint 0.9, Bezier 0.9, shuffle 0.5) on 6 cubes: every cube changes, by 0.08-0.3 on average
    per_cube = (method.backbone.seen - expected_target).abs().mean(dim=(1, 2, 3, 4))
    assert (per_cube > 0.01).all(), per_cube
    # flips move input and target together: answering the flipped original scores 0
    method.backbone.answer = expected_target
    loss, _ = method.training_loss(batch, torch.Generator().manual_seed(5))
    assert float(loss.detach()) < 1e-8
    # every transformation off: the input is the cube itself (the settings reach the transform)
    plain = _genesis(OFF)
    plain.training_loss(batch, torch.Generator().manual_seed(5))
    assert torch.equal(plain.backbone.seen, batch)
    # only local shuffling (on cubes big enough for blocks wider than a voxel): the cube's own values, moved
    big = _cubes(size=(32, 32, 16))
    shuffled = _genesis({**OFF, "local_rate": 1.0})
    shuffled.training_loss(big, torch.Generator().manual_seed(5))
    seen = shuffled.backbone.seen
    assert not torch.equal(seen, big)
    assert all(torch.isin(seen[i], big[i]).all() for i in range(len(big)))


@pytest.fixture(scope="module")
def phantom_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("genesis")
    (root / "train").mkdir()
    (root / "held_out").mkdir()
    for seed in range(3):
        write_volume(make_phantom(seed, shape=(48, 48, 24), spacing=(4.0, 4.0, 6.0)).image, root / "train" / f"c{seed}.nii.gz")
    write_volume(make_phantom(7, shape=(48, 48, 24), spacing=(4.0, 4.0, 6.0)).image, root / "held_out" / "h.nii.gz")
    return root


def test_a_short_run_lowers_the_restoration_loss_on_held_out_cubes(phantom_folders, tmp_path):
    root = phantom_folders
    out = tmp_path / "bundle"
    assert main(["pretrain", "--data", str(root / "train"), "--out", str(out), "--cache", str(tmp_path / "cache"),
                 "--width", "4", "--patch", "32", "32", "16", "--batch-size", "4", "--cubes-per-volume", "8",
                 "--steps", "60", "--lr", "1e-2", "--seed", "0", "--device", "cpu", "--progress", "none"]) == 0
    held = prepare_cubes([root / "held_out" / "h.nii.gz"], CubeSettings(patch=(32, 32, 16), cubes_per_volume=8, seed=3),
                         tmp_path / "cache")
    cubes = torch.from_numpy(held.get(np.arange(len(held)))).unsqueeze(1)
    # the transforms are drawn here, not by the method, so a method that stopped transforming is still scored
    # on the real task
    inputs, targets = genesis_transform(cubes, GenesisTransformConfig(), torch.Generator().manual_seed(0))

    def restoration_mse(state):
        method = method_class("genesis")(width=4)
        if state is not None:
            method.load_state_dict(state)
        method.eval()
        with torch.no_grad():
            return float(((torch.sigmoid(method.backbone(inputs)) - targets) ** 2).mean())

    torch.manual_seed(0)
    untrained = restoration_mse(None)
    trained = restoration_mse(load_bundle(out)[1])
    # baselines on these 8 held-out cubes: each cube's own mean as a constant 0.052 (the best constant guess),
    # 0.5 everywhere 0.089, the perturbed input itself 0.24, the untrained U-Net 0.07-0.10 (seeds 0-2);
    # trained (width 4, 60 steps, lr 1e-2): 0.029-0.032 (seeds 0-1)
    constant = float(((targets - targets.mean(dim=(2, 3, 4), keepdim=True)) ** 2).mean())
    assert constant == pytest.approx(0.052, abs=0.01)
    assert trained < 0.8 * constant, (trained, constant)
    assert trained < 0.6 * untrained, (trained, untrained)


def test_every_setting_of_every_method_is_described_and_listed(capsys):
    """Each settings field has an attribute docstring (nested ``view_*`` keys take the Genesis transform's);
    ``medssl methods`` prints every setting with its default and description; ``--json`` keeps its keys
    and adds the descriptions under ``setting_descriptions``."""
    import json
    import re

    from MedSSL.methods.base import available_methods
    from MedSSL.methods.settings import defaults, field_docs

    assert main(["methods"]) == 0
    plain = capsys.readouterr().out
    assert main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)["methods"]}
    for cls in available_methods():
        docs = field_docs(cls.Settings)
        assert list(docs) == list(defaults(cls.Settings)), cls.name
        undocumented = [k for k, text in docs.items() if not text or "\n" in text]
        assert not undocumented, f"{cls.name}: {undocumented}"
        entry = listed[cls.name]
        assert set(entry) == {"name", "description", "published", "data", "supports_2d", "settings",
                              "setting_descriptions"}
        assert entry["settings"] == defaults(cls.Settings) and entry["setting_descriptions"] == docs
        section = plain[re.search(rf"^{re.escape(cls.name)} ", plain, re.M).start():]  # its header line on
        for key, text in docs.items():
            assert any(line.split()[:3] == [key, "=", json.dumps(defaults(cls.Settings)[key]).split()[0]]
                       and line.endswith(text) for line in section.splitlines()), (cls.name, key)
    assert field_docs(GenesisTransformConfig)["flip_rate"] == field_docs(method_class("caid").Settings)["view_flip_rate"]
