"""Position channels (MedSSL.data.position): where each voxel lies in the body, as extra inputs of the
cohort network, so that two structures that look alike on either side of the body are told apart."""

import numpy as np
import pytest
import torch

from MedSSL.data.position import SCALE_MM, PositionFrame, with_position_channels
from MedSSL.data.sampling import PatchSampler, TrainingVolume, crop
from MedSSL.engine.progress import Progress
from MedSSL.engine.sliding_window import SegmentationReducer, make_predictor, run_slabs
from MedSSL.io.bundle import read_meta
from MedSSL.io.volumes import write_volume
from MedSSL.models.genesis_unet import GenesisUNet
from MedSSL.models.initial_weights import InitialWeights, apply_initial_weights, with_input_channels
from MedSSL.tasks import FinetuneConfig, LoopConfig
from MedSSL.tasks.cohort.train import finetune_cohort
from MedSSL.tasks.infer import PredictOptions
from MedSSL.tasks.infer.model import load_model
from MedSSL.tasks.infer.predict import segment
from MedSSL.transforms.augment import AugmentConfig, augment_batch
from finetune_helpers import ball, volume

torch.set_num_threads(1)


def test_channels_are_mm_from_the_body_centre_along_left_right_and_anterior_posterior():
    image = np.zeros((40, 30, 10), np.float32)
    image[10:30, 5:25] = 0.5  # the body: centre at voxel (19.5, 14.5)
    frame = PositionFrame.of(image, (2.0, 1.0, 5.0), np.eye(3))
    channels = frame.channels((0, 0, 0), image.shape)
    assert channels.shape == (2, 40, 30, 10)
    assert channels[0, 19, 0, 0] == pytest.approx(-0.5 * 2.0 / SCALE_MM)  # half a voxel right of the centre
    assert channels[1, 0, 24, 3] == pytest.approx(9.5 / SCALE_MM)
    assert np.ptp(channels[:, 5, 5], axis=1).max() == 0  # nothing along the slice axis
    # an image stored the other way round (X axis pointing right): the same anatomy, the same channels
    flipped = PositionFrame.of(image[::-1].copy(), (2.0, 1.0, 5.0), np.diag([-1.0, 1.0, 1.0]))
    assert np.allclose(flipped.channels((0, 0, 0), image.shape)[:, ::-1], channels, atol=1e-6)
    # a box (partly outside the volume) holds the same values as the whole volume there
    box = frame.channels((-3, 20, 4), (8, 8, 4))
    assert np.allclose(box[:, 3:], channels[:, 0:5, 20:28, 4:8], atol=1e-6)
    stacked = with_position_channels(image, (2.0, 1.0, 5.0), np.eye(3))
    assert stacked.shape == (3, 40, 30, 10) and np.array_equal(stacked[0], image)


def test_patches_carry_the_channels_of_where_they_were_cut():
    image = np.random.default_rng(0).random((24, 24, 12)).astype(np.float32)
    target = np.zeros((24, 24, 12), np.uint8)
    target[4:8, 4:8, 4:8] = 1
    frame = PositionFrame.of(image, (1.0, 1.0, 1.0), np.eye(3))
    sampler = PatchSampler([TrainingVolume(image, target, frame)], (8, 8, 8), 2, np.random.default_rng(1))
    images, targets = sampler.sample(6)
    assert images.shape == (6, 3, 8, 8, 8) and targets.shape == (6, 8, 8, 8)
    starts = [(x, y, z) for x in range(-7, 24) for y in range(-7, 24) for z in range(-7, 12)]
    for patch in images:  # where the image channel was cut (random values: one place), the channels were computed
        start = next(s for s in starts if np.array_equal(crop(image, np.array(s), (8, 8, 8), 0.0), patch[0]))
        assert np.allclose(patch[1:], frame.channels(start, (8, 8, 8)), atol=1e-6)


def test_augmentation_jitters_the_image_channel_only():
    image = torch.rand(2, 3, 8, 8, 4)
    target = torch.zeros(2, 8, 8, 4, dtype=torch.long)
    config = AugmentConfig(p_affine=0.0, flip_axes=(), noise_std=0.1)
    out, _ = augment_batch(image.clone(), target, config, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[:, 0], image[:, 0]) and torch.equal(out[:, 1:], image[:, 1:])


def test_initial_weights_without_position_inputs_start_at_zero_on_them():
    torch.manual_seed(0)
    plain = GenesisUNet(1, 2, width=4).eval()
    init = InitialWeights(plain.state_dict(), 4, "bundle", None)
    wide = GenesisUNet(3, 2, width=4)
    apply_initial_weights(wide, with_input_channels(init, 3))
    wide.eval()
    x = torch.rand(1, 1, 16, 16, 8)
    with torch.no_grad():
        expected = plain(x)
        got = wide(torch.cat([x, torch.randn(1, 2, 16, 16, 8)], dim=1))
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(Exception, match="input channels"):
        with_input_channels(InitialWeights(wide.state_dict(), 4, "bundle", None), 1)


@pytest.mark.parametrize("memory_mb", [1024.0, 0.05, 0.002])  # rolling, X strips, Z slabs
def test_the_sliding_window_takes_several_input_channels(memory_mb):
    torch.manual_seed(0)
    net = GenesisUNet(3, 3, width=4).eval()
    image = np.random.default_rng(0).random((3, 24, 20, 20)).astype(np.float32)
    whole = SegmentationReducer((24, 20, 20), 3)
    run_slabs(image, make_predictor(net), (16, 16, 8), 3, whole, memory_mb=1024.0)
    reducer = SegmentationReducer((24, 20, 20), 3)
    run_slabs(image, make_predictor(net), (16, 16, 8), 3, reducer, memory_mb=memory_mb)
    assert np.mean(reducer.channel == whole.channel) > 0.99


def mirror_twins(tmp_path):
    """A body holding two identical balls, left (label 1) and right (label 2) of its centre: only their
    position tells them apart (a 16-voxel patch never holds both)."""
    shape = (48, 24, 12)
    image = np.full(shape, 200.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    for value, x in ((1, 12), (2, 36)):
        inside = ball(shape, (x, 12, 6), 5)
        image[inside], labels[inside] = 800.0, value
    image += np.random.default_rng(0).normal(0, 10, shape).astype(np.float32)
    scan = volume(image, modality="CT")
    write_volume(scan, tmp_path / "scan.nii.gz")
    write_volume(scan.with_array(labels), tmp_path / "labels.nii.gz")
    return scan, labels


def twins_model(tmp_path, position: str):
    """Labels predicted on the twins' scan by a cohort network trained on it (240 steps, width 4)."""
    scan, labels = mirror_twins(tmp_path)
    config = FinetuneConfig(out=tmp_path / f"model-{position}", images=[tmp_path / "scan.nii.gz"],
                            labels=[tmp_path / "labels.nii.gz"], width=4, patch=(16, 16, 8), device="cpu",
                            position=position, loop=LoopConfig(steps=240, lr=3e-3, val_every=10**6,
                                                               checkpoint_every=10**6))
    bundle = finetune_cohort(config, Progress("none"))
    model = load_model(bundle, torch.device("cpu"))
    return bundle, labels, segment(model, scan, "scan.nii.gz", PredictOptions(all_components=True)).labels.array


def test_a_cohort_network_with_position_channels_tells_left_from_right(tmp_path):
    bundle, labels, predicted = twins_model(tmp_path, "on")
    meta = read_meta(bundle)
    assert meta["architecture"]["in_channels"] == 3 and meta["preprocessing"]["position"]["unit_mm"] == SCALE_MM
    assert meta["cohort"]["position"] == "on (--position on)"
    for value in (1, 2):
        truth, found = labels == value, predicted == value
        assert 2 * np.sum(truth & found) / (truth.sum() + found.sum()) > 0.8, value
    # the control: without them the two balls are the same to the network, and get the same mix of labels
    _, _, blind = twins_model(tmp_path, "off")
    share = [np.mean(blind[labels == value] == 1) for value in (1, 2)]
    assert abs(share[0] - share[1]) < 0.1


def test_a_refresh_keeps_the_position_channels_of_its_init_model(tmp_path):
    from MedSSL.tasks.cohort.train import position_setting

    config = FinetuneConfig(out=tmp_path / "m")
    with_channels = InitialWeights(GenesisUNet(3, 2, width=4).state_dict(), 4, "bundle", None)
    without = InitialWeights(GenesisUNet(1, 2, width=4).state_dict(), 4, "bundle", None)
    assert position_setting(config, with_channels)[0].position == "on"
    assert position_setting(config, without)[0].position == "off" == position_setting(config, None)[0].position
    assert position_setting(FinetuneConfig(out=tmp_path / "m", position="on"), without)[0].position == "on"


def test_position_channels_are_refused_for_one_slice_images(tmp_path, capsys):
    from MedSSL.commands.cli import main

    image = np.random.default_rng(0).random((32, 32, 1)).astype(np.float32)
    labels = np.zeros((32, 32, 1), np.uint8)
    labels[8:16, 8:16] = 1
    write_volume(volume(image, modality="CT"), tmp_path / "xray.nii.gz")
    write_volume(volume(labels), tmp_path / "labels.nii.gz")
    argv = ["finetune", "--image", str(tmp_path / "xray.nii.gz"), "--label", str(tmp_path / "labels.nii.gz"),
            "--engine", "network", "--position", "on", "--steps", "1", "--device", "cpu", "--progress", "none",
            "--out", str(tmp_path / "model")]
    assert main(argv) == 2
    assert "--position on" in capsys.readouterr().err and not (tmp_path / "model").exists()
