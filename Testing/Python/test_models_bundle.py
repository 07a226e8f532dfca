"""The Genesis GenesisUNet layout, official-checkpoint loading, safe loading, and bundles."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from MedSSL.io.bundle import load_bundle, read_meta, save_bundle
from MedSSL.commands.cli import main
from MedSSL.errors import MedSSLError
from MedSSL.models.initial_weights import apply_initial_weights, load_initial_weights
from MedSSL.models.genesis_unet import GenesisUNet
from medssl_testing import official_checkpoint

torch.set_num_threads(1)
KEYS_JSON = Path(__file__).resolve().parents[3] / "shared" / "research" / "genesis_state_dict_keys.json"


def test_official_layout_at_width_32():
    model = GenesisUNet()
    state = model.state_dict()
    assert len(state) == 106
    assert sum(p.numel() for p in model.parameters()) == 19_073_665
    assert tuple(state["up_tr256.ops.0.conv1.weight"].shape) == (256, 768, 3, 3, 3)
    assert tuple(state["up_tr256.up_conv.weight"].shape) == (512, 512, 2, 2, 2)
    assert tuple(state["out_tr.final_conv.weight"].shape) == (1, 64, 1, 1, 1)


@pytest.mark.skipif(not KEYS_JSON.is_file(), reason="../shared/research not present")
def test_keys_and_shapes_match_the_published_list():
    expected = json.loads(KEYS_JSON.read_text(encoding="utf-8"))["keys"]
    state = GenesisUNet().state_dict()
    assert list(state) == [k for k, _, _ in expected]
    for key, shape, _ in expected:
        assert list(state[key].shape) == shape, key


@pytest.mark.parametrize("shape", [(16, 16, 8), (24, 32, 16)])
def test_forward_shapes(shape):
    model = GenesisUNet(in_channels=2, out_channels=3, width=4).eval()
    logits, bottleneck = model.forward_with_bottleneck(torch.rand(2, 2, *shape))
    assert logits.shape == (2, 3, *shape)
    assert bottleneck.shape == (2, 64, *(s // 8 for s in shape))


def test_official_pt_loads_strictly(tmp_path):
    path = tmp_path / "Genesis_Chest_CT.pt"
    state = official_checkpoint(path, width=8)
    init = load_initial_weights(path)
    assert init.source == "official-pt" and init.width == 8 and len(init.state_dict) == 106
    model = GenesisUNet(width=8)
    model.load_state_dict(init.state_dict, strict=True)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key[len("module."):]], value)


def test_segmentation_head_may_differ_but_encoder_must_match(tmp_path):
    path = tmp_path / "g.pt"
    official_checkpoint(path, width=4)
    init = load_initial_weights(path)
    report = apply_initial_weights(GenesisUNet(out_channels=5, width=4), init)
    assert "out_tr.final_conv.weight" in report["skipped"]
    with pytest.raises(MedSSLError, match="width 4"):
        apply_initial_weights(GenesisUNet(width=8), init)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(MedSSLError, match="refused"):
        load_initial_weights(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps({"a": 1})])
def test_files_that_are_not_models_are_rejected(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(MedSSLError, match=str(path)):
        load_initial_weights(path)


def test_bundle_round_trip(tmp_path):
    model = GenesisUNet(width=4)
    save_bundle(tmp_path / "b", model.state_dict(), {"architecture": {"name": "unet3d", "width": 4}, "task": "pretrain"})
    meta, state = load_bundle(tmp_path / "b")
    assert meta["format"] == "medssl-bundle" and meta["versions"]["torch"] == torch.__version__
    assert set(state) == set(model.state_dict())
    assert load_initial_weights(tmp_path / "b").width == 4
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model.json", "weights.safetensors"]


def test_broken_bundles_are_rejected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedSSLError, match="no model.json"):
        read_meta(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(MedSSLError, match="broken model.json"):
        read_meta(broken)


def test_info_cli(tmp_path, capsys):
    official_checkpoint(tmp_path / "g.pt", width=4)
    assert main(["info", str(tmp_path / "g.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["width"] == 4
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
