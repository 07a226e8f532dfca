"""``medssl suggest``: the slices to annotate next, by model uncertainty."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from MedSSL.commands.common import (add_options, add_runtime_options, command_parser, make_progress,
                                    settings_from_args)
from MedSSL.io.settings import at_least, option


@dataclass(frozen=True)
class SuggestOptions:
    """``medssl suggest``'s options: the current annotation, where to write the JSON, how many slices, along which axis, how far apart; the sliding-window
    memory target."""

    label: Path | None = option(None, type=Path, metavar="PATH", help="the current annotation (255 = not annotated): "
                                                                       "its annotated slices are not suggested")
    out: Path | None = option(None, type=Path, metavar="JSON", help="also write the JSON to this file")
    count: int = option(5, type=int, metavar="K", help="how many slices (default {default})")
    axis: int = option(2, type=int, choices=(0, 1, 2), help="slice axis (default {default}: the Z index axis)")
    min_gap: int = option(1, type=int, metavar="N", help="suggested slices are at least N apart (default {default})")
    memory_mb: float = option(1024.0, type=float, help="sliding-window accumulator target (default {default})")

    def __post_init__(self):
        at_least(self, "min_gap", 1)


DESCRIPTION = ("Prints JSON {\"slices\": [{\"axis\", \"index\", \"score\", \"center_mm\"}, ...]}: the slices with the "
               "highest mean entropy of test-time-flipped predictions (axis = array axis in ITK index order; "
               "center_mm = LPS position of the slice centre).")


def add_parser(sub) -> None:
    p = command_parser(sub, "suggest", "rank slices to annotate next by the model's uncertainty", DESCRIPTION, "segmentation bundle")
    add_options(p, SuggestOptions)
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
    options = settings_from_args(SuggestOptions, args)
    from MedSSL.tasks.fewshot.bundle import is_fewshot_bundle

    if is_fewshot_bundle(args.model):
        from MedSSL.tasks.fewshot.task import suggest_fewshot

        result = suggest_fewshot(args.model, args.image, args.label, options.count, options.min_gap)
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
    result = suggest(model, volume, args.image, options.count, options.axis, annotation, options.min_gap, progress,
                     options.memory_mb)
    if args.out is not None:
        write_json(args.out, result)
    if progress.mode == "json":
        progress.done(outputs={**({"suggestions": str(args.out)} if args.out else {}), **result})
    else:
        print(json.dumps(result))
    return 0
