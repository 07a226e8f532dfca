"""``medssl suggest``: the slices to annotate next, by model uncertainty."""

from __future__ import annotations

import json
from pathlib import Path

from MedSSL.commands.common import add_runtime_options, make_progress


def add_parser(sub) -> None:
    p = sub.add_parser(
        "suggest", help="rank slices to annotate next by the model's uncertainty",
        description="Prints JSON {\"slices\": [{\"axis\", \"index\", \"score\", \"center_mm\"}, ...]}: the slices with the "
                    "highest mean entropy of test-time-flipped predictions (axis = array axis in ITK index order; "
                    "center_mm = LPS position of the slice centre).")
    p.add_argument("--model", required=True, type=Path, metavar="DIR", help="segmentation bundle")
    p.add_argument("--image", required=True, metavar="PATH", help="image volume or DICOM folder")
    p.add_argument("--count", type=int, default=5, metavar="K", help="how many slices (default 5)")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="slice axis (default 2: the Z index axis)")
    p.add_argument("--label", type=Path, default=None, metavar="PATH",
                   help="the current annotation (255 = not annotated): its annotated slices are not suggested")
    p.add_argument("--min-gap", type=int, default=1, metavar="N", help="suggested slices are at least N apart (default 1)")
    p.add_argument("--out", type=Path, default=None, metavar="JSON", help="also write the JSON to this file")
    p.add_argument("--memory-mb", type=float, default=1024.0, help="sliding-window accumulator target (default 1024)")
    add_runtime_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from MedSSL.errors import MedSSLError
    from MedSSL.tasks.infer.model import load_model
    from MedSSL.tasks.infer.predict import check_output_path, read_annotation, write_json
    from MedSSL.tasks.infer.suggest import suggest
    from MedSSL.io.volumes import read_volume
    from MedSSL.engine.runtime import resolve_device

    if args.out is not None:
        check_output_path(args.out, (".json",), "--out")
    if args.min_gap < 1:
        raise MedSSLError(f"--min-gap {args.min_gap}: must be at least 1")
    from MedSSL.tasks.fewshot.bundle import is_fewshot_bundle

    if is_fewshot_bundle(args.model):
        from MedSSL.tasks.fewshot.task import suggest_fewshot

        result = suggest_fewshot(args.model, args.image, args.label, args.count, args.min_gap)
        if args.out is not None:
            write_json(args.out, result)
        print(json.dumps(result))
        return 0
    model = load_model(args.model, resolve_device(args.device), allowed=("segment",))
    if model.spatial_dims == 2:
        raise MedSSLError(f"--model {args.model}: a 2D model (one-slice images); suggest ranks the slices of 3D volumes, "
                          "and a one-slice image has no other slice to annotate")
    progress = make_progress(args)
    volume = read_volume(args.image)
    annotation = read_annotation(args.label, volume, args.image) if args.label else None
    result = suggest(model, volume, args.image, args.count, args.axis, annotation, args.min_gap, progress, args.memory_mb)
    if args.out is not None:
        write_json(args.out, result)
    if progress.mode == "json":
        progress.done(outputs={**({"suggestions": str(args.out)} if args.out else {}), **result})
    else:
        print(json.dumps(result))
    return 0
