"""Applying fine-tuned bundles: loading, memory-bounded sliding-window inference, post-processing,
detections (connected components with LPS positions), and slice suggestions for annotation.

:class:`PredictOptions` (``medssl predict``'s options) lives here, apart from the modules that load the
networks, so that the CLI builds its options fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from MedSSL.errors import MedSSLError
from MedSSL.io.settings import at_least, option


@dataclass(frozen=True)
class PredictOptions:
    """tta: average flipped predictions; largest_component: keep each class's largest component;
    all_components: not even a cohort model's default clean-up (model.json ``cohort.postprocess``);
    annotation: path of the painted label map of this image (few-shot clean-up, see
    :func:`~.postprocess.keep_connected_to_annotation`); overlap: sliding-window overlap (0..0.95; the
    command's default is the bundle's); memory_mb: target size of the sliding-window accumulator;
    min_volume_mm3: smallest detection; window: sliding-window size (X, Y, Z) voxels or "plane", None =
    :func:`~.model.inference_window`; min_score / max_findings: which detections to report; fp32: no
    reduced-precision network (see :func:`~MedSSL.engine.sliding_window.make_predictor`); bn_adaptation:
    "auto", "on" or "off", see :mod:`.adaptation`. The
    :func:`~MedSSL.io.settings.option` fields are ``medssl predict``'s options."""

    annotation: Path | None = option(None, type=Path, metavar="LABEL",
                                     help="the painted label map of this image (255 = not annotated). A few-shot bundle "
                                          "needs it: the engine completes this painting. A cohort model (network from "
                                          "`finetune` on several scans): corrections, the painted planes are kept and the "
                                          "few-shot engine redoes the scan from them, planes of the network's draft and "
                                          "its class probabilities. Older "
                                          "network bundles: keep only predicted components connected to the painted "
                                          "structure and copy the painted voxels (clean-up)")
    tta: bool = option(False, action="store_true", help="average the predictions of flipped copies (4x slower)")
    largest_component: bool = option(False, action="store_true",
                                     help="keep only the largest connected component of each class")
    all_components: bool = option(False, action="store_true",
                                  help="keep every connected component (a cohort model by default removes the "
                                       "small stray pieces of the classes that were one piece in every training "
                                       "label)")
    overlap: float = option(0.5, type=float, cli_default=None,
                            help="sliding-window overlap 0..0.95 (default: the bundle's, {default})")
    window: tuple | str | None = option(None, nargs="+", metavar="X Y Z | plane",
                                        help="sliding-window size in voxels (multiples of 8; X Y or X Y 1 for a 2D model), "
                                             "or 'plane': the whole plane when it fits a memory budget (default: the "
                                             "bundle's choice, 'plane' for few-shot and 2D bundles, else the training patch)")
    min_volume_mm3: float = option(0.0, flag="--min-volume", type=float, metavar="MM3",
                                   help="smallest detection to report (default {default})")
    min_score: float | None = option(None, type=float, metavar="P",
                                     help="report only detections whose score (mean probability) is at least P "
                                          "(default: all)")
    max_findings: int | None = option(None, type=int, metavar="N", help="report at most the N best detections (default: all)")
    memory_mb: float = option(1024.0, type=float, help="target size of the sliding-window accumulator; larger volumes "
                                                       "are processed in slabs (default {default})")
    fp32: bool = option(False, action="store_true",
                        help="run the network in fp32 (default: bf16 on CPUs that compute it natively, bf16 or fp16 "
                             "on CUDA; probabilities are accumulated in fp32 on the CPU either way)")
    bn_adaptation: str = option("auto", choices=("auto", "on", "off"),
                                help="BatchNorm statistics blended with those of each scan, drawn around the classes of a "
                                     "first prediction, then the scan segmented again (about twice the time); auto: "
                                     "cohort models (default {default})")
    sw_batch_size: int = 2
    select: object = None  # None, or a function filtering the detections list (``--min-score``, ``--max-findings``)

    def __post_init__(self):
        if not 0.0 <= self.overlap <= 0.95:
            raise MedSSLError(f"--overlap {self.overlap}: expected 0..0.95")
        if not self.memory_mb > 0:
            raise MedSSLError(f"--memory-mb {self.memory_mb}: must be positive")
        at_least(self, "max_findings", 1)
        if self.largest_component and self.all_components:
            raise MedSSLError("--largest-component and --all-components: choose one")
