"""``medssl info``: what a bundle or an official checkpoint is."""

from __future__ import annotations

import json
from pathlib import Path

from MedSSL.io.bundle import BundleMeta, is_bundle, open_bundle


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a model bundle or a Models Genesis .pt")
    p.add_argument("model", metavar="BUNDLE_OR_PT", nargs="?")
    p.add_argument("--json", action="store_true", help="print the bundle's model.json (or a JSON summary of a .pt)")
    p.add_argument("--defaults", action="store_true",
                   help="print the default of every option of pretrain, finetune, predict and suggest as JSON "
                        '{"pretrain": {"steps": 1000, ...}, ...} (option names without dashes), for the Slicer modules')
    p.set_defaults(run=run)


def command_defaults() -> dict:
    """{command: {option name without dashes: default}}, read from the settings dataclasses the options come from;
    "fewshot" holds the defaults of ``finetune`` when it runs the few-shot engine (one painted image)."""
    from MedSSL.commands.common import defaults_of
    from MedSSL.commands.suggest import SuggestOptions
    from MedSSL.engine.loop import RuntimeOptions
    from MedSSL.tasks import FinetuneConfig, PretrainConfig
    from MedSSL.tasks.infer import PredictOptions

    from MedSSL.tasks.fewshot.engine import FewShotSettings

    runtime = defaults_of(RuntimeOptions)
    out = {name: {**defaults_of(cls), **runtime} for name, cls in (
        ("pretrain", PretrainConfig), ("finetune", FinetuneConfig), ("predict", PredictOptions),
        ("suggest", SuggestOptions))}
    # `finetune` on a painting runs the few-shot engine, whose --steps (appearance-MLP steps) default differs
    out["fewshot"] = {"steps": FewShotSettings.steps}
    return out


def run(args) -> int:
    if args.defaults:
        print(json.dumps(command_defaults(), indent=2))
        return 0
    if args.model is None:
        from MedSSL.errors import MedSSLError

        raise MedSSLError("info: give a bundle folder or a .pt file (or --defaults)")
    path = Path(args.model)
    if is_bundle(path) or path.is_dir():
        meta, state = open_bundle(path)
        parameters = int(sum(t.numel() for t in state.values() if t.is_floating_point()))
        if args.json:
            print(json.dumps({**meta.to_json(), "parameters": parameters}, indent=2))
        else:
            _print_summary(meta, parameters)
        return 0
    from MedSSL.models.initial_weights import load_initial_weights

    init = load_initial_weights(path)
    parameters = int(sum(t.numel() for t in init.state_dict.values() if t.is_floating_point()))
    if args.json:
        print(json.dumps({"source": "official-pt", "architecture": {"name": "unet3d", "width": init.width},
                          "tensors": len(init.state_dict), "parameters": parameters}, indent=2))
        return 0
    print(f"architecture : unet3d width {init.width} (1 in, ? out), {parameters:,} parameters")
    print("source       : official-pt (usable as --init)")
    return 0


def _print_summary(meta: BundleMeta, parameters: int) -> None:
    arch = meta.architecture
    print(f"architecture : {arch.name} width {arch.width or None} "
          f"({meta.in_channels} in, {arch.out_channels or '?'} out), {parameters:,} parameters")
    print(f"task         : {meta.task or None}")
    print(f"method       : {meta.method_name}")
    if meta.classes:
        names = ", ".join(f"{k}={v.get('name')}" for k, v in meta.class_table.items())
        print(f"classes      : {names}")
    print(f"patch        : {meta.patch_size or None}")
    print(f"preprocessing: {json.dumps(meta.preprocessing or {})}")
    training = meta.training or {}
    if training:
        print(f"training     : {training.get('steps')} steps ({training.get('stopped_by')}), best val loss "
              f"{training.get('best_val_loss')}, {training.get('seconds')} s on {training.get('device')}")
    data = meta.data_summary or {}
    if data:
        counts = [f"{data[k]} {k}" for k in ("volumes", "cubes", "datasets", "cases") if data.get(k) is not None]
        print(f"data         : {', '.join(counts) or 'not recorded'}")
    print(f"versions     : {', '.join(f'{k} {v}' for k, v in (meta.versions or {}).items())}")
