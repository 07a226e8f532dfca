"""Models Genesis image transformations in torch: whole batches, on the training device, seeded.

The official generator (``generate_pair`` in pytorch/utils.py == keras/utils.py of the Models Genesis
repository) transforms one numpy cube at a time in Python; its local pixel shuffling alone loops over
10,000 blocks per cube. This module re-implements the same transformations, written from the
description of their behaviour, with every step vectorised over the batch so that it runs on the device
that trains the network (CPU or CUDA) at a small fraction of the network's step time.

Pipeline of :func:`genesis_transform`, per sample, in this order (probabilities are
:class:`GenesisTransformConfig` fields):

1. flip (input and target together), :func:`random_flip`;
2. local pixel shuffling (``local_rate``), :func:`local_pixel_shuffle`;
3. non-linear Bezier intensity map (``nonlinear_rate``), half of the maps inverted, :func:`bezier_intensity`;
4. painting (``paint_rate``): in-painting (``inpaint_rate``) :func:`inpaint`, otherwise out-painting
   :func:`outpaint`.

The target is the flipped batch; the input is the flipped batch after steps 2-4. This module holds the
settings and the pipeline; the transformations are in :mod:`.flip_shuffle` (flips, local shuffling),
:mod:`.bezier` (intensity map) and :mod:`.painting` (in-/out-painting), re-exported here.

Tensor layout: ``(N, C, X, Y, Z)``, float, values in [0, 1], Z = the slice axis (64 x 64 x 32 cubes in
the official setting, C = 1). Every building block draws independent parameters for every sample; with
C > 1 the channels of a sample share its spatial draws (blocks, boxes, flips, intensity curve) and
only the painting noise is drawn per channel and voxel.

Randomness: every draw comes from the ``generator`` argument (a ``torch.Generator`` on the batch's
device or on the CPU; the draws are made on the generator's device and moved to the batch's device).
The same generator state and input give the same output on the same device. The sequence of draws
differs from the official code (which uses Python's and numpy's global generators), so only the
distributions are the same, not the individual cubes.

Size rules (integer division of the cube's size ``d`` along each axis, as in the official code, which
spells them out for 64 x 64 x 32; ``randint`` bounds are inclusive):

* shuffle blocks: side in [1, max(1, d // 10)], corner in [0, d - side];
* in-painting boxes: side in [max(1, d // 6), max(that, d // 3)], corner in [m, d - side - m];
* out-painting windows: side = d - randint(3 * d // 7, 4 * d // 7), corner in [m, d - side - m];

with the official margin m = 3, reduced to ``(d - side) // 2`` where the cube is too small for it
(out-painting below d = 14, in-painting below d = 9; never at the official sizes), so that no range is
empty. Integer draws are ``low + floor(u * (high - low + 1))`` of float32 uniforms u (24 random bits).

Deviations from the official code, all deliberate:

* Bezier map: the official code samples the curve at 100,000 parameter values and interpolates every
  voxel with ``np.interp``. We sample it at :data:`BEZIER_SAMPLES` = 10,001 parameter values, resample
  that piecewise-linear map on a uniform intensity grid of :data:`BEZIER_TABLE_SIZE` = 8,193 entries and
  interpolate every voxel linearly in that table (one table lookup and a multiply-add per voxel
  instead of a binary search). Against ``np.interp`` on 100,000 samples: mean absolute difference ~2e-8, 99.99th
  percentile ~4e-6, maximum ~1e-3 (only where the curve is nearly vertical, where any resampling of it
  moves values; 1e-3 is 2 HU on the [-1000, 1000] HU scale).
* Local shuffle: the random permutation inside each block comes from sorting 31-bit keys whose high
  bits are the block number and whose low ``31 - bits(blocks)`` bits are random (17 bits for 10,000
  blocks); two equal keys in a block, which would always keep their original order, are swapped with
  probability 1/2, which makes the permutation exactly uniform except for three or more equal keys in
  one block (probability ~1e-5 for the largest, 108-voxel blocks). More than 32,768 blocks: 64-bit
  keys with 32 random bits.
* In-painting noise: overlapping boxes are filled with one noise draw per voxel instead of one per box
  and voxel; i.i.d. uniform noise is the same distribution either way.
* Options the official code does not have: ``flip_z`` (the official code never flips the slice axis),
  ``paint_fill="constant"`` (the paper's wording: one value per in-painting box, one value for the
  whole outside of the out-painting windows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from MedSSL.errors import MedSSLError
from MedSSL.transforms.bezier import BEZIER_SAMPLES, BEZIER_TABLE_SIZE, apply_intensity_tables, bezier_intensity, bezier_tables
from MedSSL.transforms.flip_shuffle import apply_flips, draw_flips, local_pixel_shuffle, random_flip, shuffle_source_index
from MedSSL.transforms.painting import PAINT_FILLS, inpaint, outpaint
from MedSSL.transforms.random_draws import check_batch, uniform_draws

__all__ = [
    "BEZIER_SAMPLES",
    "BEZIER_TABLE_SIZE",
    "GenesisTransformConfig",
    "apply_flips",
    "apply_intensity_tables",
    "bezier_intensity",
    "bezier_tables",
    "draw_flips",
    "genesis_transform",
    "inpaint",
    "local_pixel_shuffle",
    "outpaint",
    "random_flip",
    "shuffle_source_index",
]



@dataclass(frozen=True)
class GenesisTransformConfig:
    """Probabilities and counts of the Models Genesis transformations; defaults = the official code.

    Sources: ``pytorch/config.py`` / ``keras/config.py`` (rates) and ``pytorch/utils.py`` (counts) of the
    Models Genesis repository, see the module docstring for the size rules. Each field's docstring says
    what it does and its official value. With the official rates a cube is in-painted with probability
    0.18, out-painted 0.72, neither 0.10. The official flip picks one of the three leading axes of the
    (1, X, Y, Z) sample, and axis 0 is the channel: X, Y or nothing is flipped, never Z.
    """

    flip_rate: float = 0.4
    """Probability of each of up to 3 flips in turn, stopping at the first miss (Models Genesis 0.4)."""
    local_rate: float = 0.5
    """Probability of local pixel shuffling (Models Genesis 0.5)."""
    nonlinear_rate: float = 0.9
    """Probability of the Bezier intensity map, half of the applied maps inverted (Models Genesis 0.9)."""
    paint_rate: float = 0.9
    """Probability of painting, in- or out- (Models Genesis 0.9)."""
    inpaint_rate: float = 0.2
    """Probability that a painted cube is in- rather than out-painted (Models Genesis 1 - outpaint_rate 0.8 = 0.2)."""
    shuffle_blocks: int = 10000
    """Blocks shuffled per cube by local pixel shuffling, >= 0 (Models Genesis num_block 10,000)."""
    inpaint_max_boxes: int = 5
    """At most this many in-painting boxes, each drawn while a draw is below box_continue_prob (Models Genesis 5)."""
    outpaint_max_windows: int = 5
    """Out-painting windows kept, 1 to this many: the first always, more as the boxes (Models Genesis 5)."""
    box_continue_prob: float = 0.95
    """Continuation probability of both box loops (Models Genesis 0.95: 0-5 boxes, P(5) = 0.77)."""
    flip_z: bool = False
    """False: flips pick X or Y, never the slice axis Z (Models Genesis); true: X, Y or Z (nnU-Net competition/)."""
    paint_fill: str = "noise"
    """Fill: "noise" = U[0, 1) per painted voxel (Models Genesis code) or "constant" = one per box / outside (paper)."""

    def __post_init__(self):
        for name in ("flip_rate", "local_rate", "nonlinear_rate", "paint_rate", "inpaint_rate", "box_continue_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise MedSSLError(f"transform setting {name} must be a probability in [0, 1], got {value!r}")
        for name, low in (("shuffle_blocks", 0), ("inpaint_max_boxes", 0), ("outpaint_max_windows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MedSSLError(f"transform setting {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.flip_z, bool):
            raise MedSSLError(f"transform setting flip_z must be true or false, got {self.flip_z!r}")
        if self.paint_fill not in PAINT_FILLS:
            raise MedSSLError(f"transform setting paint_fill must be one of {', '.join(PAINT_FILLS)}, got {self.paint_fill!r}")


# ----------------------------------------------------------------------------------------------------
# the whole pipeline


def _apply_to(x: torch.Tensor, selected: torch.Tensor, transform) -> torch.Tensor:
    """``x`` with the samples where ``selected`` (N,) is True replaced by ``transform`` of them."""
    index = torch.nonzero(selected).squeeze(1)
    if index.numel() == 0:
        return x
    if index.numel() == x.shape[0]:
        return transform(x)
    return x.index_copy(0, index, transform(x.index_select(0, index)))


def genesis_transform(
    batch: torch.Tensor, config: GenesisTransformConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Models Genesis input/target pairs for a batch.

    Args:
        batch: (N, C, X, Y, Z) float in [0, 1] (C = 1 for Models Genesis), any device; 2D images
            (N, C, X, Y) are transformed as one-slice cubes (N, C, X, Y, 1), as Models Genesis 2D does.
        config: probabilities and counts (:class:`GenesisTransformConfig`; defaults = official).
        generator: source of all randomness, on the batch's device or the CPU (None: torch's global
            generator of the batch's device).

    Returns:
        (inputs, targets), both the batch's shape, on the batch's device, dtype of the batch: targets = the
        batch after the random flip; inputs = the targets after local pixel shuffling (prob
        ``local_rate``), the Bezier intensity map (``nonlinear_rate``) and in-painting
        (``paint_rate * inpaint_rate``) or out-painting (``paint_rate * (1 - inpaint_rate)``).
    """
    if batch.dim() == 4:
        inputs, targets = genesis_transform(batch.unsqueeze(-1), config, generator)
        return inputs.squeeze(-1), targets.squeeze(-1)
    check_batch(batch)
    n = batch.shape[0]
    device = batch.device
    decide = uniform_draws(generator, (n, 4), device)
    flips = draw_flips(n, generator, config.flip_rate, 3, config.flip_z, device=device)
    targets = apply_flips(batch, flips)
    if n == 0:
        return targets.clone(), targets
    inputs = targets
    blocks = config.shuffle_blocks
    inputs = _apply_to(inputs, decide[:, 0] < config.local_rate, lambda part: local_pixel_shuffle(part, generator, blocks))
    inputs = _apply_to(inputs, decide[:, 1] < config.nonlinear_rate, lambda part: bezier_intensity(part, generator))
    painted = decide[:, 2] < config.paint_rate
    inner = decide[:, 3] < config.inpaint_rate
    p, fill = config.box_continue_prob, config.paint_fill
    inputs = _apply_to(inputs, painted & inner, lambda part: inpaint(part, generator, config.inpaint_max_boxes, p, fill))
    inputs = _apply_to(inputs, painted & ~inner, lambda part: outpaint(part, generator, config.outpaint_max_windows, p, fill))
    if inputs is targets:
        inputs = targets.clone()
    return inputs, targets
