"""``medssl pretrain``: self-supervised pretraining on unlabeled volumes."""

from __future__ import annotations

import json
from pathlib import Path

from MedSSL.errors import MedSSLError
from MedSSL.commands.common import add_options, add_runtime_options, make_progress, training_config
from MedSSL.tasks import PretrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a 3D U-Net on unlabeled CT/MR volumes",
                       description="Self-supervised pretraining. PATHs are volume files (NIfTI, NRRD, MHA/MHD), "
                                   "DICOM series folders, or folders searched recursively for them. Methods that "
                                   "learn from several labelled datasets (ark) take --datasets SPEC.json instead: "
                                   '{"datasets": [{"name": ..., "classes": {"1": "liver"}, "cases": [{"image": PATH, '
                                   '"label": PATH}, ...]}, ...]} (relative paths from the spec\'s folder).')
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", metavar="PATH", help="volumes, folders or DICOM folders")
    source.add_argument("--datasets", type=Path, metavar="SPEC.json",
                        help="labelled datasets for methods that learn from them (ark)")
    p.add_argument("--method-settings", default=None, metavar="JSON", help="method settings as a JSON object (see `medssl methods --json`)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    add_options(p, PretrainConfig)
    add_runtime_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    settings = {}
    if args.method_settings:
        try:
            settings = json.loads(args.method_settings)
        except json.JSONDecodeError as exc:
            raise MedSSLError(f"--method-settings: not valid JSON ({exc.msg})") from None
    from MedSSL.methods.base import method_class
    from MedSSL.methods.settings import from_json, unknown_keys
    from MedSSL.tasks.pretrain import pretrain

    try:
        cls = method_class(args.method)
    except KeyError as exc:
        raise MedSSLError(f"--method {args.method}: {exc.args[0]}") from None
    unknown = unknown_keys(cls.Settings, settings)
    if unknown:
        raise MedSSLError(f"--method-settings: unknown setting(s) for {args.method}: {', '.join(unknown)}")
    from_json(cls.Settings, settings)  # invalid values fail here (one-line MedSSLError), before any data is read
    config = training_config(PretrainConfig, args, data=args.data, datasets=args.datasets, out=args.out,
                             method_settings=settings)
    progress = make_progress(args)
    bundle = pretrain(config, progress)
    progress.done(bundle=str(Path(bundle).resolve()))
    return 0
