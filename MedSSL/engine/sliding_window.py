"""Memory-bounded sliding-window inference: MONAI's ``sliding_window_inference`` run slab by slab.

A full-volume sliding window keeps a (classes x voxels) accumulator: 62 classes on 25 million voxels is
6 GB in float32. Here the volume is cut into slabs along Z whose accumulators fit ``memory_mb``; each
slab is padded with ``patch_z // 2`` slices of context on both sides (recomputed, then dropped), run
through MONAI with Gaussian blending and an fp16 accumulator (MONAI accumulates in the input's dtype),
and reduced at once to what the caller keeps (e.g. argmax and the winning probability) by ``reduce``.
Few classes or small volumes give a single slab: exactly MONAI's result.

One-slice images with a 2D network (``spatial_dims=2``): the (X, Y, 1) array goes through MONAI as a
2D image (1, 1, X, Y) with a 2D window (X, Y) in one pass (no slabs: the accumulator is the image's
pixels times the channels), and ``reduce`` gets (channels, X, Y, 1) as for a one-slice volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from MedSSL.engine.acceleration import mixed_precision

#: flips used by test-time augmentation: identity and one flip per axis (dims of (N, C, X, Y, Z));
#: 2D inputs (N, C, X, Y) use the first three (see :func:`tta_flips`)
TTA_FLIPS = ((), (2,), (3,), (4,))


def tta_flips(ndim: int) -> tuple:
    """Test-time flips for an input of ``ndim`` dims: identity and one flip per spatial axis."""
    return TTA_FLIPS[: ndim - 1]


@dataclass
class Slab:
    """Slices ``[start, stop)`` go through the network; ``[core_start, core_stop)`` are kept."""

    start: int
    stop: int
    core_start: int
    core_stop: int


def plan_strips(size: int, patch: int, overlap: float, bytes_per_index: int, memory_mb: float) -> list[Slab]:
    """Cut the X axis (``size`` voxels) into strips whose rolling accumulator (``bytes_per_index`` per X
    index) fits ``memory_mb``; [] when no strip of at least one window of kept voxels fits.

    Kept ranges (``core_*``) start on the window grid (multiples of the scan interval, as MONAI's
    ``int(patch * (1 - overlap))``) and each strip adds ``patch - interval`` voxels of context on its
    inner sides: exactly the windows the whole-volume pass runs over the kept voxels."""
    interval = max(1, int(patch * (1 - overlap)))
    margin = patch - interval
    widest = int(memory_mb * 2**20 // max(1, bytes_per_index))
    core = (widest - 2 * margin) // interval * interval
    if core < patch:
        return []
    strips = []
    for core_start in range(0, size, core):
        core_stop = min(size, core_start + core)
        strips.append(Slab(max(0, core_start - margin), min(size, core_stop + margin), core_start, core_stop))
    return strips


def plan_slabs(depth: int, patch_z: int, channels: int, plane_voxels: int, memory_mb: float) -> list[Slab]:
    """Cut ``depth`` slices into slabs whose sliding-window working set fits ``memory_mb`` where
    possible. The working set is counted as twice the fp16 accumulator (``channels`` + 1 count map):
    MONAI's blending temporaries measured about 1.7x the accumulator. Each slab adds ``patch_z // 2``
    slices of context on both sides and keeps at least ``patch_z // 2`` slices (so at most 3x the
    compute of one pass; below that the budget is exceeded rather than the time)."""
    per_slice = 2 * (channels + 1) * plane_voxels * 2
    fit = int(memory_mb * 2**20 // max(1, per_slice))
    if fit >= depth:
        return [Slab(0, depth, 0, depth)]
    margin = patch_z // 2
    core = max(max(1, patch_z // 2), fit - 2 * margin)
    slabs = []
    for core_start in range(0, depth, core):
        core_stop = min(depth, core_start + core)
        slabs.append(Slab(max(0, core_start - margin), min(depth, core_stop + margin), core_start, core_stop))
    return slabs


def make_predictor(network: torch.nn.Module, tta: bool = False, entropy: bool = False,
                   low_precision: bool = True) -> Callable:
    """Window function for MONAI: (B, 1, X, Y, Z) -> (B, C [+1], X, Y, Z) probabilities (float32 on the
    CPU, float16 on a GPU); for a 2D
    network (B, 1, X, Y) -> (B, C [+1], X, Y).

    The network runs under :func:`~MedSSL.engine.acceleration.mixed_precision` when ``low_precision``
    (bf16 on CPUs with native bf16, bf16/fp16 on CUDA), else in fp32; softmax and accumulation are fp32.
    Softmax of the network's logits, averaged over :data:`TTA_FLIPS` when ``tta`` (2D: the X and Y
    flips); with ``entropy`` a
    last channel holds the predictive entropy of those (averaged) probabilities divided by log(C), in
    [0, 1].
    """

    network, channels_last = _cpu_inference_network(network)
    first = next(network.parameters(), None)
    autocast, _ = mixed_precision(first.device if first is not None else torch.device("cpu"), low_precision)

    @torch.inference_mode()
    def predict(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        flips = tta_flips(x.dim()) if tta else ((),)
        total = None
        for dims in flips:
            xi = x.flip(dims) if dims else x
            with autocast:
                logits = network(xi)
            probs = _softmax_(logits.float())
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total + probs
        probs = total / len(flips) if len(flips) > 1 else total
        if entropy:
            c = probs.shape[1]
            h = -(probs * torch.log(probs.clamp_min(1e-8))).sum(dim=1, keepdim=True) / max(np.log(c), 1e-8)
            probs = torch.cat([probs, h], dim=1)
        # CPU: float32 (fp16 arithmetic is emulated there; the rolling accumulator is float32); GPU: half
        return probs if x.device.type == "cpu" else probs.half()

    return predict


def _cpu_inference_network(network: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """(network to run, channels-last?). A 3D network in eval mode on the CPU runs as a copy with each
    BatchNorm folded into the convolution before it (the same affine map, applied once to the weights
    instead of to every activation: measured 9 % of the width-8 forward) in channels-last layout
    (oneDNN's fast 3D convolutions: measured 1.5x on the width-8 U-Net). Other networks run as given."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    params = list(network.parameters())
    if (not params or params[0].device.type != "cpu" or network.training
            or getattr(network, "spatial_dims", 3) != 3):
        return network, False
    fused = copy.deepcopy(network)
    for module in fused.modules():
        conv, norm = getattr(module, "conv1", None), getattr(module, "bn1", None)
        if isinstance(conv, torch.nn.Conv3d) and isinstance(norm, torch.nn.BatchNorm3d):
            module.conv1, module.bn1 = fuse_conv_bn_eval(conv, norm), torch.nn.Identity()
    return fused.to(memory_format=torch.channels_last_3d), True


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 computed in place (no second (N, C, X, Y, Z) float32 tensor)."""
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


@torch.inference_mode()
def run_slabs(array: np.ndarray, predictor: Callable, patch, channels: int,
              reduce: Callable[[torch.Tensor, int, int], None], *, overlap: float = 0.5, sw_batch_size: int = 2,
              memory_mb: float = 1024.0, device: torch.device = torch.device("cpu"),
              on_slab: Callable[[int, int], None] | None = None, spatial_dims: int = 3) -> None:
    """Slide ``predictor`` over ``array`` (float32 (X, Y, Z), or (C, X, Y, Z) for a network of C input
    channels: the image and its position channels) slab by slab.

    ``reduce(block, z0, z1, x0=0)`` receives each kept part: (channels, X', Y, z1 - z0) probabilities
    for slices ``[z0, z1)`` and X indices ``[x0, x0 + X')`` of the volume (float32 from the rolling
    accumulator, float16 from MONAI's slabs).

    ``channels`` is what the predictor returns. ``on_slab(i, n)`` is called after each slab or strip
    (progress).

    Memory: the whole plane's rolling accumulator when it fits ``memory_mb``; else X strips of it (see
    :func:`plan_strips`: aligned to the window grid with the context the windows need, so every kept
    voxel sees the windows and weights of the whole-volume pass; at most 2x the compute); else, when not
    even a strip fits, Z slabs of MONAI's sliding window with recomputed margins. ``spatial_dims`` 2: ``array`` is a one-slice image (X, Y, 1),
    ``patch`` (X, Y, 1) or (X, Y), and ``predictor`` takes (B, 1, X, Y) windows (see the module doc).
    """
    from monai.inferers import sliding_window_inference  # here: importing MONAI takes seconds (few-shot runs need none)

    monai_predictor = lambda x: predictor(x).contiguous()  # noqa: E731 (MONAI blends faster in the default layout)
    array = array[None] if array.ndim == 3 else array  # (C, X, Y, Z)
    if spatial_dims == 2:
        if array.shape[3] != 1:
            raise ValueError(f"a 2D sliding window needs a one-slice image (X, Y, 1), got {array.shape[1:]}")
        inputs = torch.from_numpy(np.ascontiguousarray(array[..., 0])).to(device).half()[None]
        out = sliding_window_inference(inputs, roi_size=tuple(int(p) for p in patch[:2]), sw_batch_size=sw_batch_size,
                                       predictor=monai_predictor, overlap=overlap, mode="gaussian", padding_mode="constant",
                                       cval=0.0)
        reduce(out[0, ..., None], 0, 1)
        if on_slab is not None:
            on_slab(1, 1)
        return
    x_size, y_size, depth = array.shape[1:]
    roi = tuple(int(p) for p in patch)
    per_x = (channels + 1) * y_size * roi[2] * 4  # bytes of the rolling float32 accumulator per X index
    fits = all(s >= r for s, r in zip(array.shape[1:], roi))
    if fits and x_size * per_x / 2**20 <= memory_mb:
        _run_rolling(array, predictor, roi, channels, reduce, overlap, sw_batch_size, device, on_slab)
        return
    strips = plan_strips(x_size, roi[0], overlap, per_x, memory_mb) if fits else []
    for i, strip in enumerate(strips):
        lo, hi = strip.core_start - strip.start, strip.core_stop - strip.start

        def strip_reduce(block, z0, z1, lo=lo, hi=hi, x0=strip.core_start):
            reduce(block[:, lo:hi], z0, z1, x0)

        _run_rolling(array[:, strip.start:strip.stop], predictor, roi, channels, strip_reduce, overlap, sw_batch_size,
                     device, None)
        if on_slab is not None:
            on_slab(i + 1, len(strips))
    if strips:
        return
    slabs = plan_slabs(depth, int(patch[2]), channels, x_size * y_size, memory_mb)
    for i, slab in enumerate(slabs):
        inputs = torch.from_numpy(np.ascontiguousarray(array[..., slab.start:slab.stop])).to(device)
        inputs = inputs.half()[None]
        out = sliding_window_inference(inputs, roi_size=tuple(int(p) for p in patch), sw_batch_size=sw_batch_size,
                                       predictor=monai_predictor, overlap=overlap, mode="gaussian", padding_mode="constant",
                                       cval=0.0)
        lo, hi = slab.core_start - slab.start, slab.core_stop - slab.start
        reduce(out[0, :, :, :, lo:hi], slab.core_start, slab.core_stop)
        del out, inputs
        if on_slab is not None:
            on_slab(i + 1, len(slabs))


def _run_rolling(array: np.ndarray, predictor: Callable, roi: tuple, channels: int, reduce: Callable, overlap: float,
                 sw_batch_size: int, device: torch.device, on_slab: Callable | None) -> None:
    """MONAI's sliding window (same windows, same Gaussian weights) over ``array`` (C, X, Y, Z) with a
    rolling float32 accumulator one
    window deep: windows run in Z order, and slices no later window reaches are blended, handed to
    ``reduce`` and dropped. Every window runs once (no recomputed slab margins) and the accumulator holds
    ``channels + 1`` maps of X x Y x patch_z voxels whatever the depth."""
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    shape = tuple(int(s) for s in array.shape[1:])
    interval = _get_scan_interval(shape, roi, 3, (overlap,) * 3)
    windows = sorted(dense_patch_slices(shape, roi, interval), key=lambda w: (w[2].start, w[0].start, w[1].start))
    weight = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device=device, dtype=torch.float32)
    inputs = torch.from_numpy(array).to(device)
    pz = roi[2]
    # channels last (X, Y, Z, C), as the CPU network's output: blending reads it without a transposition
    acc = torch.zeros((shape[0], shape[1], pz, channels), dtype=torch.float32, device=device)
    count = torch.zeros((shape[0], shape[1], pz), dtype=torch.float32, device=device)
    starts = sorted({w[2].start for w in windows})
    base = 0  # volume slice of acc[..., 0]

    def flush(stop: int) -> None:
        nonlocal base
        d = stop - base
        if d <= 0:
            return
        block = acc[:, :, :d].div_(count[:, :, :d, None])
        reduce(block.permute(3, 0, 1, 2), base, stop)
        for j in range(pz - d):  # shift down plane by plane (a whole-buffer copy would be half the buffer again)
            acc[:, :, j].copy_(acc[:, :, j + d])
            count[:, :, j].copy_(count[:, :, j + d])
        acc[:, :, pz - d:] = 0
        count[:, :, pz - d:] = 0
        base = stop

    done = 0
    for k, z0 in enumerate(starts):
        flush(z0)
        row = [w for w in windows if w[2].start == z0]
        for i in range(0, len(row), sw_batch_size):
            batch = row[i:i + sw_batch_size]
            x = torch.stack([inputs[:, w[0], w[1], w[2]] for w in batch])
            out = predictor(x)
            for w, o in zip(batch, out):
                local = (w[0], w[1], slice(w[2].start - base, w[2].stop - base))
                acc[local].addcmul_(o[:channels].float().permute(1, 2, 3, 0), weight[..., None])
                count[local] += weight
        done += 1
        if on_slab is not None and k + 1 < len(starts):
            on_slab(done, len(starts))
    flush(shape[2])
    if on_slab is not None:
        on_slab(len(starts), len(starts))


class SegmentationReducer:
    """Keeps, per voxel, the winning channel (uint8), its probability and the foreground probability
    (1 - p(background)) as float16: memory independent of the number of classes.

    entropy=True expects an extra last channel (see :func:`make_predictor`) and keeps it too.
    class_probs=True also keeps every foreground channel's probability, (channels - 1, X, Y, Z) float16
    (memory grows with the class count: the cohort corrections use it, :mod:`MedSSL.tasks.cohort.correction`).
    """

    def __init__(self, shape, n_channels: int, entropy: bool = False, chunk: int = 8, class_probs: bool = False):
        self.n_channels, self.chunk = n_channels, chunk
        self.channel = np.zeros(shape, dtype=np.uint8)
        self.max_prob = np.zeros(shape, dtype=np.float16)
        self.fg_prob = np.zeros(shape, dtype=np.float16)
        self.entropy = np.zeros(shape, dtype=np.float16) if entropy else None
        self.class_probs = np.zeros((n_channels - 1,) + tuple(shape), dtype=np.float16) if class_probs else None

    def __call__(self, block: torch.Tensor, z0: int, z1: int, x0: int = 0) -> None:
        """block (channels, X', Y, z1 - z0): X indices [x0, x0 + X'), slices [z0, z1)."""
        xs = slice(x0, x0 + block.shape[1])
        for a in range(0, z1 - z0, self.chunk):
            b = min(z1 - z0, a + self.chunk)
            part = block[..., a:b].float()
            probs = part[: self.n_channels]
            best, arg = probs.max(dim=0)
            self.channel[xs, :, z0 + a:z0 + b] = arg.to(torch.uint8).cpu().numpy()
            self.max_prob[xs, :, z0 + a:z0 + b] = best.half().cpu().numpy()
            self.fg_prob[xs, :, z0 + a:z0 + b] = (1.0 - probs[0]).clamp(0, 1).half().cpu().numpy()
            if self.entropy is not None:
                self.entropy[xs, :, z0 + a:z0 + b] = part[self.n_channels].half().cpu().numpy()
            if self.class_probs is not None:
                self.class_probs[:, xs, :, z0 + a:z0 + b] = probs[1:].clamp(0, 1).half().cpu().numpy()
