"""MedSSLSegmentLogic.segmentMany against real MRML and the real backend: several volume nodes segmented by one
``medssl predict`` call (a segmentation node per volume, on its own grid), and a folder of scans on disk
(label maps and summary.csv written, nothing loaded). Here, not in MedSSLSegment/Testing: it builds a bundle
with torch, which the module folders never import."""

import csv
import importlib.util
import sys

import numpy as np
import pytest

from MedSSLCommonLib import backend, nodes
from slicer_testing_helpers import obliqueMatrix

REASON = None if importlib.util.find_spec("torch") and backend.backendRoot() else "MedSSL backend or torch not available"
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def threshold_bundle(path):
    """A width-4 segmentation bundle whose output is a fixed function of the image (untrained weights)."""
    import torch

    from MedSSL.io.bundle import save_bundle
    from MedSSL.models.genesis_unet import GenesisUNet

    torch.manual_seed(0)
    net = GenesisUNet(1, 2, 4)
    meta = {"architecture": {"name": "unet3d", "width": 4, "in_channels": 1, "out_channels": 2, "spatial_dims": 3},
            "task": "segment", "classes": {"1": {"name": "organ", "color": [0.8, 0.2, 0.2]}}, "channels": [0, 1],
            "preprocessing": {"intensity": {"modality": "CT", "ct_window": [-1000, 1000], "mr_percentiles": [0.5, 99.5]},
                              "target_spacing_mm": None, "modality": "CT"},
            "patch_size": [16, 16, 16]}
    save_bundle(path, net.state_dict(), meta)
    return str(path)


def logic():
    from MedSSLSegmentLib.logic import MedSSLSegmentLogic

    return MedSSLSegmentLogic(python=sys.executable, device="cpu")


def volume(scene, shape, name, seed):
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    return nodes.addVolumeFromArray(array, obliqueMatrix(spacing=(1.5, 1.0, 2.0)), name, scene=scene)


def test_segment_many_volume_nodes_and_a_folder(scene, real_backend, tmp_path):
    model = threshold_bundle(tmp_path / "model")
    first, second = volume(scene, (12, 20, 24), "first", 0), volume(scene, (10, 16, 16), "second", 1)
    segment = logic()
    events = []
    made = segment.segmentMany([first, second], model, onEvent=events.append)
    assert [n.GetName() for n in made] == ["first model", "second model"]
    stages = [e["message"] for e in events if e.get("event") == "stage" and e.get("stage") == "predict"]
    assert [m.split(":")[0] for m in stages] == ["scan 1 of 2", "scan 2 of 2"]
    one = segment.segment(second, model)  # the same model on one volume gives the same labels
    many_labels, _ = nodes.segmentsLabelmap(made[1], second)
    one_labels, _ = nodes.segmentsLabelmap(one, second)
    assert many_labels.shape == (10, 16, 16) and np.array_equal(many_labels, one_labels)

    folder = tmp_path / "scans"
    nodes.writeVolume(first, str(folder / "a.nrrd"))
    nodes.writeVolume(second, str(folder / "b.nrrd"))
    before = scene.GetNumberOfNodes()
    summary = segment.segmentMany(str(folder), model, outputDir=str(tmp_path / "out"))
    rows = list(csv.DictReader(open(summary, encoding="utf-8")))
    assert [r["image"] for r in rows] == ["a.nrrd", "b.nrrd"] and (tmp_path / "out" / "a.nii.gz").is_file()
    assert scene.GetNumberOfNodes() == before


def test_segment_many_refuses_a_mix_and_nothing(scene, real_backend, tmp_path):
    model = threshold_bundle(tmp_path / "model")
    with pytest.raises(ValueError, match="not both"):
        logic().segmentMany([volume(scene, (8, 8, 8), "v", 0), str(tmp_path)], model)
    with pytest.raises(ValueError, match="at least one"):
        logic().segmentMany([], model)
