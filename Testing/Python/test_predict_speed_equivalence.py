"""The faster prediction path gives the labels of the plain algorithm: MONAI's Gaussian sliding window over
the whole volume in float32, softmax probabilities blended, then argmax. Labels may differ only at voxels
whose top two blended probabilities tie within floating-point tolerance (fp32 network), or within bf16's
(the default reduced-precision network on CPUs with native bf16, or fp32 on the others)."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from MedSSL.engine.sliding_window import SegmentationReducer, make_predictor, run_slabs
from MedSSL.models.genesis_unet import GenesisUNet
from finetune_helpers import blobs_ct

torch.set_num_threads(1)
PATCH = (16, 16, 8)


def reference(net, image, overlap):
    """(C, X, Y, Z) float32 probabilities of the plain algorithm (no slabs, no fp16, no memory format)."""

    @torch.no_grad()
    def predictor(x):
        return torch.softmax(net(x.float()), dim=1)

    x = torch.from_numpy(image)[None, None]
    return sliding_window_inference(x, PATCH, 2, predictor, overlap=overlap, mode="gaussian")[0].numpy()


def phantom():
    image, _ = blobs_ct((40, 36, 30), seed=3)
    return np.clip((image.astype(np.float32) + 1000) / 2000, 0, 1)


@pytest.mark.parametrize("low_precision", [False, True], ids=["fp32", "default"])
# 1024 MB: the whole plane's rolling accumulator; 0.22 MB: three X strips of it; 0.05 MB: MONAI's Z slabs
@pytest.mark.parametrize("classes,memory_mb,tol", [(5, 1024.0, 2e-3), (2, 1024.0, 2e-3), (5, 0.22, 2e-3),
                                                   (5, 0.05, 1e-2)])
def test_labels_unchanged(classes, memory_mb, tol, low_precision, monkeypatch):
    tol = tol if not low_precision else max(tol, 1e-2)
    from MedSSL.engine import sliding_window

    plans = []
    real_plan = sliding_window.plan_strips
    monkeypatch.setattr(sliding_window, "plan_strips", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    torch.manual_seed(classes)
    net = GenesisUNet(1, classes, 4).eval()
    image = phantom()
    ref = reference(net, image, 0.5)
    reducer = SegmentationReducer(image.shape, classes)
    run_slabs(image, make_predictor(net, low_precision=low_precision), PATCH, classes, reducer, overlap=0.5, memory_mb=memory_mb)
    assert [len(p) for p in plans] == {1024.0: [], 0.22: [3], 0.05: [0]}[memory_mb]  # the path under test
    ordered = np.sort(ref, axis=0)
    gap = ordered[-1] - ordered[-2]
    differ = reducer.channel != ref.argmax(0)
    assert differ.mean() < 0.01
    assert (gap[differ] <= tol).all(), f"{differ.sum()} voxels differ, largest probability gap {gap[differ].max()}"
    assert np.abs(reducer.max_prob.astype(np.float32) - ordered[-1]).max() < max(tol, 2e-3)
    assert np.abs(reducer.fg_prob.astype(np.float32) - (1 - ref[0])).max() < max(tol, 2e-3)
