"""How the default detection filter (MedSSL.tasks.infer.detect: DEFAULT_MIN_SCORE, DEFAULT_MIN_VOLUME_MM3,
DEFAULT_MAX_FINDINGS) is chosen: FROC of cohort models' findings on new scans.

Detection rides on the segmentation network: a finding is a connected component of a predicted class, its
score the mean probability inside it (:func:`MedSSL.tasks.infer.detect.find_detections`). The detectors
here are the cohort models that ``bench_cohort.py --keep-models`` trained (a few painted scans of a cohort
in ``../shared/data``); each is applied, as ``medssl predict --detections`` would, to the
test subjects of its own draw (never a subject it trained on; the cohort model's clean-up applied, as
predict does, unless ``--all-components``), and every component is scored against
the truth, class by class, with the CAD-PE rules of ``medssl evaluate --detections``
(:mod:`MedSSL.tasks.evaluate.detection`): a finding is a hit when its centre falls inside a true
component of its class, each true component counts once, anything else is a false positive.

Printed (JSON; ``--out`` keeps it as froc.json): the pooled FROC (sensitivity at 0.5, 1, 2, 4 and 8 false
positives per scan), and for a grid of (minimum score, minimum volume, cap) the sensitivity, false
positives per scan and findings shown per scan. ``choice`` is the setting a reader would want by the rule
stated in :func:`choose`: the most sensitive with at most ``--max-fp`` false positives per scan.

    python Testing/Benchmarks/bench_cohort.py --cohort la_lge_mri --train 4 --seeds 0 --arms cohort --keep-models --out runs/la
    python Testing/Benchmarks/bench_detection_defaults.py --cohort la_lge_mri --models runs/la/models --out runs/froc_la
    python Testing/Benchmarks/bench_detection_defaults.py --quick     # phantom cohort, a tiny model (smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cohort  # noqa: E402

MIN_SCORES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: at most 100 mm3 (about 6 mm across): the cohorts hold organs, and a larger minimum chosen on them would
#: hide the small lesions a detector is also used for
MIN_VOLUMES_MM3 = (0.0, 20.0, 100.0)
CAPS = (None, 10, 5, 3, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cohort", default="la_lge_mri")
    p.add_argument("--data", type=Path, default=bench_cohort.DATA)
    p.add_argument("--models", type=Path, nargs="+", default=[], metavar="DIR",
                   help="folders of bundles kept by bench_cohort.py --keep-models (seed<S>_n<N>/cohort)")
    p.add_argument("--test", type=int, default=4, help="test subjects per draw, as bench_cohort.py was run")
    p.add_argument("--held-out", type=int, default=None, help="as bench_cohort.py was run")
    p.add_argument("--all-components", action="store_true",
                   help="score every component (predict --all-components) instead of the prediction after the cohort "
                        "model's clean-up")
    p.add_argument("--max-fp", type=float, default=1.0, help="false positives per scan a reader accepts (default 1)")
    p.add_argument("--cap", type=int, default=10,
                   help="choose the score and volume with the cap held at this (default 10: the cohorts hold 1 or 4 "
                        "structures per scan, which cannot choose how many lesions a reader should see); 0 = choose "
                        "the cap too")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--report", type=Path, nargs="+", default=None, metavar="RUN",
                   help="the froc.json of runs on several cohorts: one setting for all (the most sensitive on average "
                        "with at most --max-fp false positives per scan in every cohort)")
    p.add_argument("--quick", action="store_true", help="a phantom cohort and a 4-step model (smoke test)")
    return p.parse_args(argv)


def findings_of(model, case: dict, all_components: bool = False) -> list[dict]:
    """Every component of ``model``'s prediction on ``case`` as ``medssl predict --detections`` finds them (the
    cohort model's clean-up applied unless ``all_components``), before any filter. model: a loaded bundle."""
    from MedSSL.io.volumes import read_volume
    from MedSSL.tasks.infer import PredictOptions
    from MedSSL.tasks.infer.detect import find_detections
    from MedSSL.tasks.infer.predict import segment

    volume = read_volume(case["image"])
    seg = segment(model, volume, case["image"], PredictOptions(all_components=all_components))
    prob = np.where(seg.labels.array > 0, seg.max_prob, 0).astype(np.float32)
    return find_detections(seg.labels.array, prob, volume, {v: model.name_of(v) for v in model.classes})


def match_by_class(found: list[dict], case: dict) -> tuple[list[tuple], int]:
    """(per finding: (finding, true component id or 0 = false positive), true components): a finding hits
    only a component of its own class; ids are unique across classes."""
    from MedSSL.io.volumes import read_volume
    from MedSSL.tasks.evaluate.detection import match_detections

    truth = read_volume(case["label"])
    truth.array = np.rint(truth.array).astype(np.uint8)
    matched, total = [], 0
    for value in sorted({int(v) for v in np.unique(truth.array) if v} | {f["label"] for f in found}):
        mine = [f for f in found if f["label"] == value]
        pairs, count, _ = match_detections(mine, truth, lesion_label=value, ignore_value=None)
        matched += [(f, total + lesion if lesion > 0 else 0) for f, (_, lesion) in zip(mine, pairs)]
        total += count
    return matched, total


def sweep(scans: list[tuple[list, int]]) -> list[dict]:
    """Sensitivity, false positives and findings shown per scan for each (min score, min volume, cap)."""
    from MedSSL.tasks.infer.detect import select_findings

    lesions = sum(total for _, total in scans)
    per_scan = [([f for f, _ in matched], {id(f): lesion for f, lesion in matched}) for matched, _ in scans]
    rows = []
    for min_score in MIN_SCORES:
        for min_volume in MIN_VOLUMES_MM3:
            for cap in CAPS:
                found, fp, shown = 0, 0, 0
                for findings, hit in per_scan:
                    kept = select_findings(findings, min_score, min_volume, cap)
                    found += len({hit[id(f)] for f in kept if hit[id(f)]})
                    fp += sum(1 for f in kept if not hit[id(f)])
                    shown += len(kept)
                rows.append({"min_score": min_score, "min_volume_mm3": min_volume, "cap": cap,
                             "sensitivity": round(found / lesions, 4) if lesions else None,
                             "fp_per_scan": round(fp / len(scans), 3), "shown_per_scan": round(shown / len(scans), 2)})
    return rows


def choose(rows: list[dict], max_fp: float, cap: int | None = None) -> dict | None:
    """The most sensitive setting with at most ``max_fp`` false positives per scan (with ``cap``: among the
    settings with that cap only); among equals the one with fewer false positives, then today's defaults when
    they are among them (a default changes only when the data say so), then the least restrictive (lower
    score and volume, larger cap): a filter should hide what is wrong, not what might be right."""
    allowed = [r for r in rows if r["sensitivity"] is not None and r["fp_per_scan"] <= max_fp
               and (cap is None or r["cap"] == cap)]
    if not allowed:
        return None
    best = min(allowed, key=lambda r: (-r["sensitivity"], r["fp_per_scan"], r["min_score"], r["min_volume_mm3"],
                                       -(r["cap"] or 10**6)))
    current = default_row(allowed)
    if current is not None and (current["sensitivity"], current["fp_per_scan"]) == (best["sensitivity"], best["fp_per_scan"]):
        return current
    return best


def default_row(rows: list[dict]) -> dict:
    from MedSSL.tasks.infer.detect import DEFAULT_MAX_FINDINGS, DEFAULT_MIN_SCORE, DEFAULT_MIN_VOLUME_MM3

    return next((r for r in rows if r["min_score"] == DEFAULT_MIN_SCORE and r["min_volume_mm3"] == DEFAULT_MIN_VOLUME_MM3
                 and r["cap"] == DEFAULT_MAX_FINDINGS), None)


def model_draws(models: Path) -> list[tuple[int, int, Path]]:
    """(seed, n, bundle) of each seed<S>_n<N>/cohort under ``models``."""
    out = []
    for folder in sorted(models.glob("seed*_n*")):
        seed, n = folder.name[4:].split("_n")
        if (folder / "cohort" / "model.json").is_file():
            out.append((int(seed), int(n), folder / "cohort"))
    return out


def run(args, models: list[Path]) -> dict:
    import torch

    from MedSSL.tasks.evaluate.detection import froc
    from MedSSL.tasks.infer.model import load_model

    cohort_args = bench_cohort.parse_args(["--cohort", args.cohort, "--data", str(args.data), "--test", str(args.test)]
                                          + (["--held-out", str(args.held_out)] if args.held_out else [])
                                          + (["--quick"] if args.quick else []))
    if args.quick:
        cohort_args.phantom_dir = args.phantom_dir
    cases, _, _ = bench_cohort.cohort_cases(cohort_args)
    scans, per_scan = [], []
    for folder in models:
        for seed, n, bundle in model_draws(folder):
            _, test_cases = bench_cohort.draw(cohort_args, cases, n, seed)
            model = load_model(bundle, torch.device("cpu"))
            for case in test_cases:
                matched, total = match_by_class(findings_of(model, case, args.all_components), case)
                scans.append((matched, total))
                per_scan.append({"seed": seed, "n": n, "test": case["name"], "true_components": total,
                                 "findings": len(matched), "hits": len({lesion for _, lesion in matched if lesion})})
                print(json.dumps(per_scan[-1]), flush=True)
                per_scan[-1]["scored"] = [{"label": f["label"], "score": f["score"], "volume_mm3": f["volume_mm3"],
                                           "component": lesion} for f, lesion in matched]
    if not scans:
        raise SystemExit("no seed<S>_n<N>/cohort bundle under --models (bench_cohort.py --keep-models writes them)")
    curve = froc([[(f["score"], lesion) for f, lesion in matched] for matched, _ in scans], [t for _, t in scans])
    rows = sweep(scans)
    return {"cohort": "phantom" if args.quick else args.cohort, "all_components": args.all_components, "scans": len(scans), "per_scan": per_scan,
            "froc": curve["froc"], "mean_sensitivity": curve["mean_sensitivity"],
            "false_positives_total": curve["false_positives"], "default": default_row(rows),
            "choice": choose(rows, args.max_fp, args.cap or None), "max_fp": args.max_fp, "rows": rows,
            "hardware": bench_cohort.hardware()}


def scans_of(result: dict) -> list[tuple[list, int]]:
    """(matched findings, true components) per scan, back from a froc.json."""
    return [([(f, f["component"]) for f in scan["scored"]], scan["true_components"]) for scan in result["per_scan"]]


def report(paths: list[Path], max_fp: float, cap: int | None = None) -> dict:
    """One setting for every cohort: per (min score, min volume, cap), each cohort's sensitivity and false
    positives per scan; the choice maximises the mean sensitivity over cohorts with at most ``max_fp`` false
    positives per scan in each (ties as in :func:`choose`)."""
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    sweeps = {run["cohort"]: sweep(scans_of(run)) for run in runs}
    merged = []
    for i, first in enumerate(next(iter(sweeps.values()))):
        cells = {cohort: rows[i] for cohort, rows in sweeps.items()}
        merged.append({**{k: first[k] for k in ("min_score", "min_volume_mm3", "cap")},
                       "sensitivity": round(float(np.mean([c["sensitivity"] for c in cells.values()])), 4),
                       "fp_per_scan": max(c["fp_per_scan"] for c in cells.values()),
                       "per_cohort": {k: {"sensitivity": c["sensitivity"], "fp_per_scan": c["fp_per_scan"],
                                          "shown_per_scan": c["shown_per_scan"]} for k, c in cells.items()}})
    return {"cohorts": list(sweeps), "max_fp": max_fp, "cap": cap, "choice": choose(merged, max_fp, cap),
            "default": default_row(merged),
            "rows": merged}


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    if args.report:
        result = report(args.report, args.max_fp, args.cap or None)
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "froc_report.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        return 0
    torch.set_num_threads(args.threads)
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="medssl-froc-") as tmp:
            args.phantom_dir = Path(tmp) / "phantom"
            args.phantom_dir.mkdir()
            models = Path(tmp) / "models"
            bench_cohort.main(["--quick", "--arms", "cohort", "--keep-models", "--out", str(models.parent / "run")])
            result = run(args, [models.parent / "run" / "models"])
    else:
        result = run(args, args.models)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "froc.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
