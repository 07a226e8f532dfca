"""medssl predict: geometry (oblique grids, resampling back), slab-wise memory-bounded inference,
probabilities, test-time flips, clean-ups, and detections with LPS positions."""

import json

import numpy as np
import pytest
import torch

from MedSSL.commands.cli import main
from MedSSL.tasks.infer.detect import find_detections
from MedSSL.tasks.infer.model import load_model
from MedSSL.tasks.infer.postprocess import keep_connected_to_annotation, largest_component_per_class
from MedSSL.engine.sliding_window import SegmentationReducer, make_predictor, plan_slabs, run_slabs
from MedSSL.io.volumes import read_volume, to_sitk, write_volume
from MedSSL.models.genesis_unet import GenesisUNet
from finetune_helpers import OBLIQUE, ball, blobs_ct, segment_bundle, volume

torch.set_num_threads(1)


def same_geometry(a, b):
    return (a.shape == b.shape and np.allclose(a.spacing, b.spacing) and np.allclose(a.origin, b.origin)
            and np.allclose(a.direction, b.direction, atol=1e-6))


# ----- geometry ------------------------------------------------------------------------------------


def test_outputs_keep_an_oblique_input_geometry(tmp_path):
    segment_bundle(tmp_path / "m", values=(0, 2, 9), patch=(16, 16, 8))
    image, _ = blobs_ct((20, 18, 10), seed=0)
    src = volume(image, spacing=(1.2, 0.9, 2.5), origin=(-30.0, 12.5, 80.0), direction=OBLIQUE)
    write_volume(src, tmp_path / "ct.nrrd")
    assert main(["predict", "--device", "cpu", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "ct.nrrd"),
                 "--out", str(tmp_path / "out" / "pred.nii.gz"), "--probabilities", str(tmp_path / "prob.nrrd"),
                 "--progress", "none"]) == 0
    pred, prob, ref = read_volume(tmp_path / "out" / "pred.nii.gz"), read_volume(tmp_path / "prob.nrrd"), read_volume(tmp_path / "ct.nrrd")
    assert same_geometry(pred, ref) and same_geometry(prob, ref)
    assert pred.array.dtype == np.uint8 and set(np.unique(pred.array)) <= {0, 2, 9}
    assert prob.array.dtype == np.float32 and prob.array.min() >= 0 and prob.array.max() <= 1


def test_a_model_at_another_spacing_writes_back_on_the_input_grid(tmp_path):
    segment_bundle(tmp_path / "m", values=(0, 1), patch=(16, 16, 8), spacing=(2.0, 2.0, 4.0))
    image, _ = blobs_ct((30, 26, 12), seed=1)
    src = volume(image, spacing=(1.1, 1.3, 2.5), origin=(5.0, -7.0, 3.0), direction=OBLIQUE)
    write_volume(src, tmp_path / "ct.nii.gz")
    assert main(["predict", "--device", "cpu", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "ct.nii.gz"), "--out",
                 str(tmp_path / "pred.nrrd"), "--probabilities", str(tmp_path / "p.nii.gz"), "--progress", "none"]) == 0
    ref = read_volume(tmp_path / "ct.nii.gz")
    assert same_geometry(read_volume(tmp_path / "pred.nrrd"), ref)
    assert same_geometry(read_volume(tmp_path / "p.nii.gz"), ref)


# ----- sliding window in slabs ---------------------------------------------------------------------


def test_slab_plan_bounds_the_accumulator():
    # 62 classes on a 25-million-voxel volume: one full accumulator would be 62 x 25e6 x 2 bytes = 3.1 GB
    slabs = plan_slabs(depth=292, patch_z=32, channels=62, plane_voxels=292 * 292, memory_mb=1024)
    assert len(slabs) > 1
    assert slabs[0].core_start == 0 and slabs[-1].core_stop == 292
    assert all(a.core_stop == b.core_start for a, b in zip(slabs, slabs[1:]))
    per_slice = 2 * 63 * 292 * 292 * 2  # twice the fp16 accumulator
    assert max(s.stop - s.start for s in slabs) * per_slice <= 1024 * 2**20
    assert plan_slabs(depth=40, patch_z=16, channels=3, plane_voxels=100, memory_mb=512) == [plan_slabs(40, 16, 3, 100, 512)[0]]


def test_strip_plan_follows_the_window_grid_and_the_budget():
    from MedSSL.engine.sliding_window import plan_strips

    per_x = 63 * 512 * 32 * 4  # 62 classes + count, a 512-voxel Y axis, 32-slice windows, float32
    strips = plan_strips(512, 64, 0.5, per_x, 1024.0)
    assert [(s.start, s.stop, s.core_start, s.core_stop) for s in strips] == [
        (0, 224, 0, 192), (160, 416, 192, 384), (352, 512, 384, 512)]
    assert all((s.stop - s.start) * per_x <= 1024 * 2**20 for s in strips)
    assert all(s.start % 32 == 0 and s.core_start % 32 == 0 for s in strips)  # on the window grid
    assert plan_strips(512, 64, 0.5, per_x, 200.0) == []  # not one window of kept voxels fits: Z slabs


def test_slabs_agree_with_one_pass():
    torch.manual_seed(0)
    net = GenesisUNet(1, 5, 4).eval()
    image = np.random.default_rng(0).random((24, 20, 40)).astype(np.float32)
    results = []
    for memory_mb in (1000.0, 0.05):  # one slab; then slabs of 8 kept slices with 4 slices of context
        reducer = SegmentationReducer(image.shape, 5)
        run_slabs(image, make_predictor(net), (16, 16, 8), 5, reducer, memory_mb=memory_mb)
        results.append(reducer)
    assert len(plan_slabs(40, 8, 5, 24 * 20, 0.05)) > 2
    assert np.mean(results[0].channel == results[1].channel) > 0.97
    assert np.abs(results[0].max_prob.astype(np.float32) - results[1].max_prob.astype(np.float32)).mean() < 0.02


def test_the_reducer_keeps_each_foreground_class_probability_when_asked():
    """class_probs=True: (channels - 1, X, Y, Z) float16, the network's softmax of every foreground channel,
    consistent with the winning channel and the foreground probability kept anyway."""
    torch.manual_seed(0)
    net = GenesisUNet(1, 4, 4).eval()
    image = np.random.default_rng(1).random((16, 16, 8)).astype(np.float32)
    reducer = SegmentationReducer(image.shape, 4, class_probs=True)
    run_slabs(image, make_predictor(net, low_precision=False), (16, 16, 8), 4, reducer)
    with torch.inference_mode():
        softmax = torch.softmax(net(torch.from_numpy(image)[None, None]).float(), 1)[0].numpy()
    assert reducer.class_probs.shape == (3, 16, 16, 8) and reducer.class_probs.dtype == np.float16
    assert np.abs(reducer.class_probs.astype(np.float32) - softmax[1:]).max() < 0.01
    assert np.abs(reducer.class_probs.astype(np.float32).sum(0) - reducer.fg_prob.astype(np.float32)).max() < 0.01
    assert SegmentationReducer(image.shape, 4).class_probs is None  # not kept unless asked


def test_test_time_flips_give_probabilities():
    torch.manual_seed(0)
    net = GenesisUNet(1, 3, 4).eval()
    x = torch.rand(1, 1, 16, 16, 8)
    p = make_predictor(net, tta=True, entropy=True)(x).float()
    assert p.shape == (1, 4, 16, 16, 8)
    assert torch.allclose(p[:, :3].sum(1), torch.ones(1, 16, 16, 8), atol=1e-2)
    assert (p[:, 3] >= 0).all() and (p[:, 3] <= 1.001).all()


# ----- clean-ups -----------------------------------------------------------------------------------


def test_largest_component_and_connection_to_the_painted_structure():
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[2:8, 2:8, 2:8] = 4  # big
    labels[12:14, 12:14, 2:4] = 4  # small, far away
    labels[15:18, 2:5, 5:8] = 7
    kept = largest_component_per_class(labels)
    assert (kept[12:14, 12:14, 2:4] == 0).all() and (kept[2:8, 2:8, 2:8] == 4).all() and (kept == 7).sum() == 27
    painted = np.full(labels.shape, 255, np.uint8)
    painted[:, :, 3] = 0
    painted[12:14, 12:14, 3] = 4  # the user painted the small one, not the big one
    out = keep_connected_to_annotation(labels, painted)
    assert (out[12:14, 12:14, 2:4] == 4).all()
    assert (out[2:8, 2:8, :] == 0).all()  # not connected to class 4's strokes: removed
    assert (out == 7).sum() == 27  # class 7 was not painted at all: left as predicted
    assert (out[:, :, 3][painted[:, :, 3] == 0] == 0).all()  # the painted background is copied


# ----- detections ----------------------------------------------------------------------------------


def test_detection_positions_are_lps_on_an_oblique_grid():
    shape, spacing, origin = (30, 24, 12), (0.8, 1.1, 2.5), (-40.0, 25.0, -100.0)
    grid = volume(np.zeros(shape, np.int16), spacing=spacing, origin=origin, direction=OBLIQUE)
    labels = np.zeros(shape, np.uint8)
    labels[ball(shape, (8, 7, 5), 3)] = 2
    labels[ball(shape, (21, 15, 6), 2)] = 2
    labels[ball(shape, (20, 5, 3), 1.5)] = 5
    prob = np.zeros(shape, np.float32)
    prob[labels == 2] = 0.6
    prob[ball(shape, (21, 15, 6), 2)] = 0.9
    prob[labels == 5] = 0.7
    found = find_detections(labels, prob, grid, {2: "lesion", 5: "node"})
    assert [d["score"] for d in found] == [0.9, 0.7, 0.6]
    assert [d["label"] for d in found] == [2, 5, 2] and found[0]["name"] == "lesion"
    image = to_sitk(grid)
    for det, centre in zip(found, [(21, 15, 6), (20, 5, 3), (8, 7, 5)]):
        assert np.allclose(det["center_mm"], image.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre]), atol=1e-3)
        mask = labels == det["label"]
        comp = ball(shape, centre, 3 if centre == (8, 7, 5) else (2 if centre == (21, 15, 6) else 1.5)) & mask
        assert det["voxels"] == comp.sum()
        assert det["volume_mm3"] == pytest.approx(comp.sum() * np.prod(spacing), rel=1e-4)
        lo, hi = np.array(det["bbox_mm"])
        idx = np.argwhere(comp)
        corners = [image.TransformContinuousIndexToPhysicalPoint([float(v + s) for v, s in zip(i, offs)])
                   for i in idx for offs in ((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (-0.5, 0.5, -0.5))]
        assert np.all(np.array(corners) >= lo - 1e-3) and np.all(np.array(corners) <= hi + 1e-3)
        assert np.all(lo <= det["center_mm"]) and np.all(det["center_mm"] <= hi)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small bundle that finds bright blobs, trained on an oblique grid."""
    folder = tmp_path_factory.mktemp("trained")
    image, labels = blobs_ct((32, 32, 16), seed=4, n=5, radius=4)
    geometry = dict(spacing=(1.5, 1.5, 2.0), origin=(10.0, -20.0, 30.0), direction=OBLIQUE)
    write_volume(volume(image, **geometry), folder / "ct.nii.gz")
    write_volume(volume(labels, **geometry), folder / "lab.nii.gz")
    assert main(["finetune", "--device", "cpu", "--image", str(folder / "ct.nii.gz"), "--label", str(folder / "lab.nii.gz"),
                 "--out", str(folder / "m"), "--width", "8", "--lr", "3e-3", "--steps", "120", "--patch", "16", "16", "16",
                 "--no-augment", "--detection", "--classes", "1=blob", "--progress", "none"]) == 0
    return folder, labels


def test_detections_json_end_to_end(trained, tmp_path, capsys):
    folder, labels = trained
    assert main(["predict", "--device", "cpu", "--model", str(folder / "m"), "--image", str(folder / "ct.nii.gz"), "--out",
                 str(tmp_path / "pred.nrrd"), "--detections", str(tmp_path / "det.json"), "--tta",
                 "--progress", "json"]) == 0
    done = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert done["event"] == "done" and done["outputs"]["detections"] == str(tmp_path / "det.json")
    found = json.loads((tmp_path / "det.json").read_text(encoding="utf-8"))
    assert found and all(set(d) >= {"label", "name", "center_mm", "score", "volume_mm3", "bbox_mm"} for d in found)
    assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)
    assert all(d["name"] == "blob" and d["label"] == 1 for d in found)
    ref = read_volume(folder / "ct.nii.gz")
    from scipy import ndimage

    comp, n = ndimage.label(labels == 1)
    truth = ref.index_to_physical(np.array(ndimage.center_of_mass(labels == 1, comp, range(1, n + 1))))
    big = [d for d in found if d["volume_mm3"] > 50]
    for centre in truth:  # every blob is found within 2 mm of where it is
        assert min(np.linalg.norm(np.array(d["center_mm"]) - centre) for d in big) < 2.0
    pred = read_volume(tmp_path / "pred.nrrd").array

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    # a threshold at 150 HU scores 1.0 on these blobs, so the bar is about geometry, not learning: the labels
    # must land on the input's oblique grid better than the truth moved by one voxel along any axis (0.82-0.83)
    moved = max(dice(np.roll(labels == 1, 1, axis=a), labels == 1) for a in range(3))
    assert dice(pred == 1, labels == 1) > moved, (dice(pred == 1, labels == 1), moved)


def test_annotation_and_largest_component_options(trained, tmp_path):
    folder, labels = trained
    painted = np.full(labels.shape, 255, np.uint8)
    painted[:, :, 8] = labels[:, :, 8]
    ref = read_volume(folder / "ct.nii.gz")
    write_volume(ref.with_array(painted), tmp_path / "painted.nrrd")
    assert main(["predict", "--device", "cpu", "--model", str(folder / "m"), "--image", str(folder / "ct.nii.gz"), "--out",
                 str(tmp_path / "a.nrrd"), "--annotation", str(tmp_path / "painted.nrrd"), "--progress", "none"]) == 0
    out = read_volume(tmp_path / "a.nrrd").array
    assert np.array_equal(out[:, :, 8], labels[:, :, 8])  # painted voxels are kept as painted
    from scipy import ndimage

    comp, n = ndimage.label(out == 1)
    touching = set(np.unique(comp[:, :, 8])) - {0}
    assert set(range(1, n + 1)) == touching  # every component left touches the painted slice
    assert main(["predict", "--device", "cpu", "--model", str(folder / "m"), "--image", str(folder / "ct.nii.gz"), "--out",
                 str(tmp_path / "b.nrrd"), "--largest-component", "--progress", "none"]) == 0
    assert ndimage.label(read_volume(tmp_path / "b.nrrd").array == 1)[1] <= 1


def test_fp32_option_reaches_the_network(trained, tmp_path, monkeypatch):
    """--fp32 runs the network without autocast; by default it runs under the loop's reduced precision
    (bf16 where the CPU computes it natively, so on other CPUs the two runs agree exactly). A cohort model
    runs three times per scan (the draft, the BatchNorm adaptation's patches, the adapted network): each of
    them in the run's precision."""
    from MedSSL.engine import sliding_window
    from MedSSL.engine.acceleration import cpu_has_native_bf16
    from MedSSL.tasks.infer import adaptation

    folder, _ = trained
    seen = {"default": [], "fp32": []}
    real = sliding_window.mixed_precision
    run = []

    def recording(device, enabled):
        seen[run[-1]].append(enabled)
        return real(device, enabled)

    monkeypatch.setattr(sliding_window, "mixed_precision", recording)
    monkeypatch.setattr(adaptation, "mixed_precision", recording)
    outputs = {}
    for name, extra in (("default", []), ("fp32", ["--fp32"])):
        run.append(name)
        out = tmp_path / f"{name}.nrrd"
        assert main(["predict", "--device", "cpu", "--model", str(folder / "m"), "--image", str(folder / "ct.nii.gz"), "--out", str(out),
                     "--progress", "none", *extra]) == 0
        outputs[name] = read_volume(out).array
    assert seen == {"default": [True] * 3, "fp32": [False] * 3}
    changed = float((outputs["default"] != outputs["fp32"]).mean())
    assert changed < 0.01 if cpu_has_native_bf16() else changed == 0.0


def test_load_model_reads_the_bundle(tmp_path):
    segment_bundle(tmp_path / "m", values=(0, 3, 117), names={3: "a", 117: "b"})
    model = load_model(tmp_path / "m", torch.device("cpu"))
    assert model.task == "segment" and model.channel_values.tolist() == [0, 3, 117]
    assert model.name_of(117) == "b" and not model.network.training
