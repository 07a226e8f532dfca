"""``medssl info``: what a bundle or an official checkpoint is."""

from __future__ import annotations

import json
from pathlib import Path

from MedSSL.io.bundle import is_bundle, read_meta


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a model bundle or a Models Genesis .pt")
    p.add_argument("model", metavar="BUNDLE_OR_PT", nargs="?")
    p.add_argument("--json", action="store_true", help="print the bundle's model.json (or a JSON summary of a .pt)")
    p.add_argument("--defaults", action="store_true",
                   help="print the default of every option of pretrain, finetune, predict and suggest as JSON "
                        '{"pretrain": {"steps": 1000, ...}, ...} (option names without dashes), for the Slicer modules')
    p.set_defaults(run=run)


def command_defaults() -> dict:
    """{command: {option name without dashes: default}}, read from the settings dataclasses the options come from."""
    from MedSSL.commands.common import defaults_of
    from MedSSL.commands.suggest import SuggestOptions
    from MedSSL.engine.loop import RuntimeOptions
    from MedSSL.tasks import FinetuneConfig, PretrainConfig
    from MedSSL.tasks.infer import PredictOptions

    runtime = defaults_of(RuntimeOptions)
    return {name: {**defaults_of(cls), **runtime} for name, cls in (
        ("pretrain", PretrainConfig), ("finetune", FinetuneConfig), ("predict", PredictOptions),
        ("suggest", SuggestOptions))}


def run(args) -> int:
    if args.defaults:
        print(json.dumps(command_defaults(), indent=2))
        return 0
    if args.model is None:
        from MedSSL.errors import MedSSLError

        raise MedSSLError("info: give a bundle folder or a .pt file (or --defaults)")
    path = Path(args.model)
    if is_bundle(path) or path.is_dir():
        meta = read_meta(path)
        from MedSSL.io.bundle import load_bundle

        _, state = load_bundle(path)
        meta = {**meta, "parameters": int(sum(t.numel() for t in state.values() if t.is_floating_point()))}
    else:
        from MedSSL.models.initial_weights import load_initial_weights

        init = load_initial_weights(path)
        meta = {"source": "official-pt", "architecture": {"name": "unet3d", "width": init.width},
                "tensors": len(init.state_dict),
                "parameters": int(sum(t.numel() for t in init.state_dict.values() if t.is_floating_point()))}
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    _print_summary(meta)
    return 0


def _print_summary(meta: dict) -> None:
    arch = meta.get("architecture", {})
    print(f"architecture : {arch.get('name')} width {arch.get('width')} "
          f"({arch.get('in_channels', 1)} in, {arch.get('out_channels', '?')} out), {meta.get('parameters', 0):,} parameters")
    if "source" in meta:
        print(f"source       : {meta['source']} (usable as --init)")
        return
    method = meta.get("method") or {}
    print(f"task         : {meta.get('task')}")
    print(f"method       : {method.get('name')}")
    if meta.get("classes"):
        names = ", ".join(f"{k}={v.get('name') if isinstance(v, dict) else v}" for k, v in meta["classes"].items())
        print(f"classes      : {names}")
    print(f"patch        : {meta.get('patch_size')}")
    prep = meta.get("preprocessing") or {}
    print(f"preprocessing: {json.dumps(prep)}")
    training = meta.get("training") or {}
    if training:
        print(f"training     : {training.get('steps')} steps ({training.get('stopped_by')}), best val loss "
              f"{training.get('best_val_loss')}, {training.get('seconds')} s on {training.get('device')}")
    data = meta.get("data_summary") or {}
    if data:
        counts = [f"{data[k]} {k}" for k in ("volumes", "cubes", "datasets", "cases") if data.get(k) is not None]
        print(f"data         : {', '.join(counts) or 'not recorded'}")
    versions = meta.get("versions") or {}
    print(f"versions     : {', '.join(f'{k} {v}' for k, v in versions.items())}")
