"""``medssl pretrain``: self-supervised pretraining on unlabeled volumes."""

from __future__ import annotations

import json
from pathlib import Path

from MedSSL.errors import MedSSLError
from MedSSL.commands.common import add_runtime_options, add_training_options, loop_config, make_progress


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
    p.add_argument("--method", default="genesis", help="self-supervised method (see `medssl methods`; default genesis)")
    p.add_argument("--method-settings", default=None, metavar="JSON", help="method settings as a JSON object (see `medssl methods --json`)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--init", default=None, metavar="BUNDLE_OR_PT", help="start from a bundle or an official Models Genesis .pt")
    add_training_options(p, steps=1000, batch=6, lr=1e-3, patch=(64, 64, 32))
    p.add_argument("--cubes-per-volume", type=int, default=32, help="cubes sampled per volume (default 32, as Models Genesis)")
    p.add_argument("--modality", choices=("auto", "CT", "MR"), default="auto", help="intensity normalisation: CT window [-1000, 1000] HU or MR percentiles (default: from the data)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="resample to this spacing in mm first (default: keep the voxel grid, as Models Genesis)")
    p.add_argument("--cache", type=Path, default=None, help="cube cache folder (default $MEDSSL_CACHE or ~/.cache/medssl/cubes)")
    p.add_argument("--workers", type=int, default=1, help="loader threads preparing batches while the GPU trains (default 1; 0 = none)")
    p.add_argument("--channels-last", action="store_true", help="channels-last 3D memory format (often faster on GPUs with AMP)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (falls back to eager mode if compilation fails)")
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
    from MedSSL.tasks.pretrain import PretrainConfig, pretrain

    try:
        cls = method_class(args.method)
    except KeyError as exc:
        raise MedSSLError(f"--method {args.method}: {exc.args[0]}") from None
    unknown = set(settings) - set(cls.defaults)
    if unknown:
        raise MedSSLError(f"--method-settings: unknown setting(s) for {args.method}: {', '.join(sorted(unknown))}")
    progress = make_progress(args)
    config = PretrainConfig(
        data=args.data, datasets=args.datasets, out=args.out, method=args.method, method_settings=settings, init=args.init,
        width=args.width, patch=tuple(args.patch), batch_size=args.batch_size, cubes_per_volume=args.cubes_per_volume,
        modality=args.modality, spacing=tuple(args.spacing) if args.spacing else None, cache_dir=args.cache,
        device=args.device, seed=args.seed, resume=args.resume, compile=args.compile, workers=args.workers,
        channels_last=args.channels_last, loop=loop_config(args, default_steps=1000),
    )
    bundle = pretrain(config, progress)
    progress.done(bundle=str(Path(bundle).resolve()))
    return 0
