"""Test-time BatchNorm adaptation (MedSSL.tasks.infer.adaptation): a cohort network's statistics blended with
those of the scan it segments, on a copy made for that scan only."""

import numpy as np
import pytest
import torch

from finetune_helpers import segment_bundle, volume
from MedSSL.models.batchnorm import running_statistics
from MedSSL.tasks.infer import PredictOptions
from MedSSL.tasks.infer.adaptation import adapt_to_scan, wants_adaptation
from MedSSL.tasks.infer.model import load_model, prepare
from MedSSL.tasks.infer.predict import segment

PATCH = (16, 16, 16)


def scan(seed, brightness=300.0):
    """A 32 x 32 x 16 CT (HU) with a bright ball on noise; its ball as a label map."""
    rng = np.random.default_rng(seed)
    x, y, z = np.mgrid[:32, :32, :16]
    ball = ((x - 14 - seed) ** 2 + (y - 16) ** 2 + (z - 8) ** 2) < 36
    image = rng.normal(-100.0, 40.0, (32, 32, 16)) + brightness * ball
    return volume(image.astype(np.float32)), ball.astype(np.uint8)


@pytest.fixture
def cohort_bundle(tmp_path):
    segment_bundle(tmp_path / "cohort", patch=PATCH, cohort={"width": 4})
    segment_bundle(tmp_path / "plain", patch=PATCH)
    return tmp_path


def model_of(folder):
    return load_model(folder, torch.device("cpu"))


def test_auto_adapts_cohort_models_only(cohort_bundle):
    cohort, plain = model_of(cohort_bundle / "cohort"), model_of(cohort_bundle / "plain")
    assert wants_adaptation(cohort, "auto") and not wants_adaptation(plain, "auto")
    assert wants_adaptation(plain, "on") and not wants_adaptation(cohort, "off")
    assert PredictOptions().bn_adaptation == "auto"


def test_the_scans_statistics_are_blended_into_a_copy(cohort_bundle):
    """share 0 keeps the bundle's statistics, share 1 gives the scan's, 0.5 their average; the scan's depend
    on the scan; the loaded network is never changed."""
    model = model_of(cohort_bundle / "cohort")
    bundle = running_statistics(model.network)
    stats = {}
    for name, brightness in (("dim", 300.0), ("bright", 900.0)):
        image, ball = scan(0, brightness)
        array, work = prepare(model, image, "scan")
        for share in (0.0, 0.5, 1.0):
            adapted = adapt_to_scan(model, array, ball, work.spacing, work.direction, share=share)
            assert not adapted.training and adapted is not model.network
            stats[name, share] = running_statistics(adapted)
    for before, after in zip(bundle, running_statistics(model.network)):
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    for name in ("dim", "bright"):
        for (m0, v0), (m5, v5), (m1, v1) in zip(stats[name, 0.0], stats[name, 0.5], stats[name, 1.0]):
            torch.testing.assert_close(m5, (m0 + m1) / 2)
            torch.testing.assert_close(v5, (v0 + v1) / 2)
        assert all(torch.equal(m, b[0]) for (m, _), b in zip(stats[name, 0.0], bundle))
    first_dim, first_bright = stats["dim", 1.0][0][0], stats["bright", 1.0][0][0]
    assert not torch.allclose(first_dim, bundle[0][0]) and not torch.allclose(first_dim, first_bright)


def test_each_scan_is_segmented_as_if_it_were_the_only_one(cohort_bundle):
    """One loaded model, several scans (batch predict): a scan's result does not depend on the scans before
    it, and the adapted prediction differs from the bundle's statistics alone."""
    model = model_of(cohort_bundle / "cohort")
    first, _ = scan(1, 900.0)
    second, _ = scan(2)
    alone = segment(model, second, "second", PredictOptions())
    segment(model, first, "first", PredictOptions())
    after = segment(model, second, "second", PredictOptions())
    off = segment(model, second, "second", PredictOptions(bn_adaptation="off"))
    assert np.array_equal(alone.max_prob, after.max_prob)
    assert np.array_equal(alone.labels.array, after.labels.array)
    assert not np.array_equal(alone.max_prob, off.max_prob)
