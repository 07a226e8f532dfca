"""The few-shot bundle: ``task: "fewshot"``, written by ``medssl finetune`` on a painting.

``model.json`` (the common bundle format, :mod:`MedSSL.io.bundle`) holds::

    "architecture": {"name": "fewshot-appearance", "features": F, "hidden": 32, "out_channels": C + 1,
                     "feature_scales_mm": [1, 2, 4], "backbone_width": w | null},
    "task": "fewshot",
    "classes": {"1": {"name": ..., "color": [r, g, b]}, ...},
    "fewshot": {"weight": ..., "taper": ..., "calibration": {"w/t": mean Dice, ...},
                "painted_planes": {"i": [...], "j": [...], "k": [...]}, "margin_mm": ...},
    "preprocessing": {"intensity": {...}}    (the feature network's, when there is one)

``weights.safetensors``: the MLP as ``appearance.*`` and, when the appearance uses a U-Net's features,
that network as ``backbone.*``. The painting itself is not stored: ``medssl predict`` needs it again
(``--annotation``), which is what the few-shot workflow passes anyway.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from MedSSL.io.bundle import Architecture, BundleMeta, is_bundle, open_bundle, read_bundle_meta, save_bundle
from MedSSL.errors import MedSSLError
from MedSSL.tasks.fewshot.appearance import SCALES_MM, AppearanceNet
from MedSSL.tasks.fewshot.engine import TREND, FewShotModel
from MedSSL.data.painted_planes import AXIS_NAMES, PaintedPlanes

TASK = "fewshot"
ARCHITECTURE = "fewshot-appearance"


def save_fewshot_bundle(out, model: FewShotModel, classes: dict, extra: dict | None = None) -> Path:
    """Write ``model`` as a bundle in ``out``; ``classes``: the bundle's JSON classes {"1": {...}}; ``extra``:
    more :class:`BundleMeta` fields (history, data_summary, init)."""
    net = model.net
    state = {f"appearance.{k}": v for k, v in net.state_dict().items()}
    backbone_width = None
    if model.backbone is not None:
        state.update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
        backbone_width = int(model.backbone.down_tr64.ops[0].conv1.out_channels)
    meta = BundleMeta(
        architecture=Architecture(ARCHITECTURE, features=int(net.mean.numel()), hidden=int(net.layers[0].out_features),
                                  out_channels=int(net.layers[-1].out_features), feature_scales_mm=list(SCALES_MM),
                                  backbone_width=backbone_width),
        task=TASK, classes=classes,
        fewshot={"weight": model.weight, "taper": model.taper, "calibration": model.calibration,
                 "painted_planes": {AXIS_NAMES[a]: list(model.planes.planes[a]) for a in range(3)},
                 "class_values": list(model.classes), "margin_mm": model.margin_mm},
        **(extra or {}))
    if model.backbone_intensity is not None:
        meta = replace(meta, preprocessing={"intensity": model.backbone_intensity.to_dict()})
    return save_bundle(out, state, meta)


def is_fewshot_meta(meta: BundleMeta) -> bool:
    return meta.task == TASK


def is_fewshot_bundle(path) -> bool:
    """True for a bundle folder whose model.json says it is a few-shot model."""
    return is_bundle(path) and is_fewshot_meta(read_bundle_meta(path))


def load_fewshot_bundle(path, what: str = "--model") -> tuple[FewShotModel, BundleMeta]:
    """(model, meta) of a few-shot bundle; MedSSLError naming ``path`` when it is not one or is broken."""
    meta, state = open_bundle(path)
    if not is_fewshot_meta(meta):
        raise MedSSLError(f"{what} {path}: task {meta.task or None!r}, not a few-shot model")
    arch, info = meta.architecture, meta.fewshot or {}
    if not arch.features or not arch.out_channels:
        raise MedSSLError(f"{what} {path}: broken few-shot bundle (model.json gives no architecture features or out_channels)")
    try:
        net = AppearanceNet(arch.features, arch.out_channels - 1, arch.hidden or 32)
        net.load_state_dict({k[len("appearance."):]: v for k, v in state.items() if k.startswith("appearance.")})
        planes = PaintedPlanes(tuple(tuple(int(v) for v in info["painted_planes"].get(n, [])) for n in AXIS_NAMES))
        classes = [int(v) for v in info["class_values"]]
        weight = float(info["weight"])
        taper = info["taper"] if info["taper"] == TREND else float(info["taper"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise MedSSLError(f"{what} {path}: broken few-shot bundle ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    backbone = intensity = None
    if arch.backbone_width:
        from MedSSL.models.initial_weights import InitialWeights
        from MedSSL.tasks.fewshot.network_features import build_backbone, intensity_of

        sub = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        init = InitialWeights(sub, arch.backbone_width, "bundle", meta)
        backbone, intensity = build_backbone(init), intensity_of(init)
    net.eval()
    model = FewShotModel(net, classes, weight, taper, dict(info.get("calibration") or {}), planes, backbone, intensity,
                         float(info.get("margin_mm", 10.0)))
    return model, meta
