"""Paint a few scans, segment the cohort: the cohort model on new subjects, with its baselines.

For each seed a random draw of ``n`` training subjects of a cohort in ``../shared/data`` (la_lge_mri,
chaos_t2_mri); the test subjects are drawn from the others, so no scored subject was trained on. Arms
(``--arms``), each scored by Dice per class on the whole test scan:

* ``cohort``: k planes painted on each training scan (spread over each structure, as the engine benchmark
  paints them), ``medssl finetune`` defaults (paintings completed by the few-shot engine, CPU grid and
  width), then ``predict`` on each test scan with no touch; ``correct1`` / ``correct2``: the draft
  corrected on the 1 or 2 worst planes (:func:`MedSSL.tasks.cohort.correction.correct_draft`; ``--gaps``
  and ``--draft-planes`` compare its settings on the same drafts); ``--largest-component`` adds
  ``<arm>+lcc``, the same prediction with only each class' largest component;
* ``self``: ``cohort`` with self-training (``finetune --unlabeled``): the draw's other subjects, neither
  trained on nor tested, given without labels;
* ``dense``: the same network trained on the dense labels of the same subjects (upper bound);
* ``sparse``: the same network trained on the painted planes only (``--no-completion``);
* ``atlas``: each training scan registered to the test scan with SimpleITK (affine, Mattes mutual
  information), its dense label propagated, majority vote;
* ``engine3`` / ``engine5``: the few-shot engine alone with 3 / 5 planes painted on the test scan.

Training variants measured against the defaults (docs/cohort.md): ``--position on`` (position channels),
``--dice-absent skip`` (the Dice term over the classes present in each batch), ``--lr``, ``--patch``,
``--batch``, ``--steps``, ``--no-augment``, ``--init`` with ``--transfer``; rows carry them and the summary
names such arms ``cohort+position-on``, ``cohort+lr0.003+dice-skip``, ``cohort+patch128x128x8``,
``cohort+pretrained-encoder``, ...; ``--no-draft-prior`` corrects without the network's class probabilities
(``correct1+no-prior``).

Runs in-process (the CLI's functions) with ``--threads`` torch threads. Prints one JSON object per result
line and a summary; ``--out`` keeps them (results.jsonl, summary.json). ``--report`` merges the
results.jsonl of several runs into one table (table.md) and a figure (cohort.png: mean Dice on new scans
against the number of training scans, one line per arm, one panel per cohort).

    python Testing/Benchmarks/bench_cohort.py --cohort la_lge_mri --train 1 2 4 --seeds 0 1 2 --out runs/cohort
    python Testing/Benchmarks/bench_cohort.py --report runs/cohort runs/cohort-chaos --out runs/report
    python Testing/Benchmarks/bench_cohort.py --quick        # phantom cohort, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fewshot_cases import DATA, paint  # noqa: E402

ARMS = ("cohort", "self", "refine", "engine-to", "correct1", "correct2", "dense", "sparse", "atlas", "engine3",
        "engine5")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cohort", default="la_lge_mri", help="a cohort folder of ../shared/data (default %(default)s)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--train", type=int, nargs="+", default=[1, 2, 4], help="training subjects per draw")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--test", type=int, default=4, help="test subjects per draw (default %(default)s)")
    p.add_argument("--held-out", type=int, default=None, metavar="K",
                   help="K subjects (a fixed draw) are the test set of every draw and never trained or pretrained "
                        "on; training subjects are drawn from the others (the pool)")
    p.add_argument("--print-pool", action="store_true",
                   help="print the pool's image paths (with --held-out: what `medssl pretrain` may read) and exit")
    p.add_argument("--planes", type=int, default=5, help="planes painted per training scan (default %(default)s)")
    p.add_argument("--arms", nargs="+", default=["cohort", "correct1", "correct2", "dense", "atlas", "engine5"],
                   choices=ARMS)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: finetune's for a cohort model)")
    p.add_argument("--max-time", type=float, default=None, help="fine-tuning seconds (default: none)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: finetune's)")
    p.add_argument("--patch", type=int, nargs=3, default=None, help="training patch (default: finetune's)")
    p.add_argument("--batch", type=int, default=None, help="patches per step (default: finetune's)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="finetune --no-augment: no random warps or intensity jitter while training")
    p.add_argument("--tilt", type=float, default=0.0, help="augmentation: out-of-plane rotations up to this many "
                   "degrees (default 0: in-plane only)")
    p.add_argument("--dice-absent", choices=("default", "skip", "keep"), default="default",
                   help="the Dice term over the classes present in each batch (skip) or over all (keep)")
    p.add_argument("--spacing", type=float, nargs=3, default=None)
    p.add_argument("--confidence", type=float, default=None, help="--completion-confidence (default: finetune's)")
    p.add_argument("--init", default=None, help="pretrained bundle for --init")
    p.add_argument("--transfer", choices=("all", "encoder"), default="all",
                   help="finetune --transfer: which --init weights are loaded (default: all)")
    p.add_argument("--position", choices=("auto", "on", "off"), default="auto",
                   help="finetune --position (position channels; default: finetune's)")
    p.add_argument("--gaps", type=float, nargs="+", default=None,
                   help="corrections: planes nearer than this (mm) are redone (default: predict's); several: one "
                        "row per value")
    p.add_argument("--draft-planes", nargs="+", default=None,
                   help="corrections: planes of the draft per class given to the engine, or 'all' (every plane "
                        "beyond the gap; the first design) (default: predict's); several: one row per value")
    p.add_argument("--no-draft-prior", dest="draft_prior", action="store_false",
                   help="corrections without the network's class probabilities among the engine's features (the "
                        "design before 2026-12-07; rows and arms marked no-prior)")
    p.add_argument("--bn-adaptation", nargs="+", choices=("auto", "on", "off"), default=["auto"],
                   help="predict --bn-adaptation for the network arms (default auto: on for cohort models); several: "
                        "each prediction (and its corrections) once per value, arms marked bn-on / bn-off")
    p.add_argument("--target", type=float, default=None, metavar="DICE",
                   help="also count the planes a user corrects, worst first, until the draft reaches this mean "
                        "Dice (rows 'to<DICE>' with planes_to_target; null when --cap planes were not enough); with "
                        "arm engine-to, the planes painted from nothing the engine alone needs (rows 'engine-to<DICE>')")
    p.add_argument("--cap", type=int, default=8, help="most planes corrected with --target (default %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--largest-component", action="store_true",
                   help="also score each network prediction with only its largest component per class (arm+lcc)")
    p.add_argument("--keep-models", action="store_true", help="keep the trained bundles under --out/models")
    p.add_argument("--models", type=Path, default=None, metavar="DIR",
                   help="score the bundles an earlier run kept (its --out/models) instead of training (train_s 0)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--report", type=Path, nargs="+", default=None, metavar="RUN",
                   help="merge the results.jsonl of these --out folders into --out/table.md and cohort.png; no training")
    p.add_argument("--quick", action="store_true", help="a phantom cohort of 3 subjects, a few steps (smoke test)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- data
def cohort_cases(args) -> tuple[list[dict], dict, int]:
    """[{"name", "image": Path, "label": Path}], classes {value: name}, painting axis."""
    if args.quick:
        return phantom_cohort(args.phantom_dir), {1: "liver", 2: "spleen"}, 2
    root = args.data / args.cohort
    if not (root / "cohort.json").is_file():
        raise SystemExit(f"{root}: no cohort.json (is ../shared/data there?)")
    spec = json.loads((root / "cohort.json").read_text(encoding="utf-8"))
    cases = [{"name": c, "image": root / f"{c}_image.nii.gz", "label": root / f"{c}_label.nii.gz"} for c in spec["cases"]]
    return cases, {int(k): v for k, v in spec["classes"].items()}, 2


def phantom_cohort(folder: Path) -> list[dict]:
    """Three phantom subjects (liver 1, spleen 2) of slightly different anatomy, written as NIfTI."""
    from MedSSL.data.phantom import make_phantom
    from MedSSL.io.volumes import write_volume

    cases = []
    for i in range(3):
        phantom = make_phantom(seed=i, shape=(48, 48, 32), spacing=(4.0, 4.0, 6.0))
        keep = np.where(np.isin(phantom.labels.array, (1, 2)), phantom.labels.array, 0).astype(np.uint8)
        write_volume(phantom.image, folder / f"p{i}_image.nii.gz")
        write_volume(phantom.labels.with_array(keep), folder / f"p{i}_label.nii.gz")
        cases.append({"name": f"p{i}", "image": folder / f"p{i}_image.nii.gz", "label": folder / f"p{i}_label.nii.gz"})
    return cases


def read_case(case: dict):
    from MedSSL.io.volumes import read_volume

    image, label = read_volume(case["image"]), read_volume(case["label"])
    return image, np.rint(label.array).astype(np.uint8)


def paint_all(truth: np.ndarray, axis: int, k: int) -> tuple[np.ndarray, list[int]]:
    """k planes spread over each class' extent (the union of the picks of every class), 255 elsewhere."""
    picks = set()
    for value in [v for v in np.unique(truth) if v]:
        picks.update(paint((truth == value).astype(np.uint8), axis, k)[1])
    picks = sorted(picks)
    sparse = np.full(truth.shape, 255, np.uint8)
    index = [slice(None)] * 3
    index[axis] = picks
    sparse[tuple(index)] = truth[tuple(index)]
    return sparse, picks


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes) -> dict:
    out = {}
    for value in classes:
        p, t = pred == value, truth == value
        denom = p.sum() + t.sum()
        out[int(value)] = float(2 * np.logical_and(p, t).sum() / denom) if denom else 1.0
    return out


# ----------------------------------------------------------------------------------------------- arms
def train(args, cases, axis, mode: str, work: Path, seed: int, unlabeled=()) -> tuple[Path, float]:
    """Fine-tune on ``cases`` with labels "painted" (k planes), "dense" or "sparse" (paintings, no completion);
    ``unlabeled``: cases given without labels (self-training)."""
    from MedSSL.engine.loop import LoopConfig
    from MedSSL.engine.progress import Progress
    from MedSSL.io.volumes import read_volume, write_volume
    from MedSSL.tasks import FinetuneConfig
    from MedSSL.tasks.cohort.train import finetune_cohort

    labels = []
    for case in cases:
        if mode == "dense":
            labels.append(case["label"])
            continue
        image = read_volume(case["image"])
        _, truth = read_case(case)
        painted, _ = paint_all(truth, axis, args.planes)
        path = work / f"{case['name']}_painted.nii.gz"
        write_volume(image.with_array(painted), path)
        labels.append(path)
    defaults = FinetuneConfig(out=work)
    loop = LoopConfig(steps=args.steps or defaults.loop.steps, max_time=args.max_time, val_every=10**6,
                      checkpoint_every=10**6, lr=args.lr or defaults.loop.lr)
    config = FinetuneConfig(
        out=work / f"model_{mode}{'_self' if unlabeled else ''}", images=[c["image"] for c in cases], labels=labels,
        unlabeled=[c["image"] for c in unlabeled], init=args.init, transfer=args.transfer,
        width=args.width, spacing=tuple(args.spacing) if args.spacing else None, seed=seed, device="cpu", loop=loop,
        complete_paintings=mode != "sparse", position=args.position,
        patch=tuple(args.patch) if args.patch else None, batch_size=args.batch or defaults.batch_size,
        augment_tilt_deg=args.tilt, augment=args.augment,
        **({} if args.dice_absent == "default" else {"dice_skip_absent": args.dice_absent == "skip"}),
        completion_confidence=defaults.completion_confidence if args.confidence is None else args.confidence)
    started = time.perf_counter()
    finetune_cohort(config, Progress("bar"), budget_given=args.steps is not None or args.max_time is not None)
    return config.out, time.perf_counter() - started


def largest_component_per_class(labels):
    from MedSSL.tasks.infer.postprocess import largest_component_per_class as keep_largest

    return keep_largest(labels)


def predict(model_dir: Path, case: dict, class_probs: bool = False, bn_adaptation: str = "auto"):
    """(segmentation, seconds); ``class_probs``: also each class' probability, for the corrections (not timed
    apart: only rows that correct ask for them); ``bn_adaptation``: ``predict --bn-adaptation``."""
    import torch

    from MedSSL.io.volumes import read_volume
    from MedSSL.tasks.infer import PredictOptions
    from MedSSL.tasks.infer.model import load_model
    from MedSSL.tasks.infer.predict import segment

    model = load_model(model_dir, torch.device("cpu"))
    volume = read_volume(case["image"])
    started = time.perf_counter()
    options = PredictOptions(overlap=float(model.meta.inference_setting("overlap") or 0.5), bn_adaptation=bn_adaptation)
    seg = segment(model, volume, case["image"], options, class_probs=class_probs)
    return seg, time.perf_counter() - started


def atlas(train_cases, case, classes) -> tuple[np.ndarray, float]:
    """Majority vote of the training labels registered (affine, Mattes MI) onto ``case``."""
    import SimpleITK as sitk

    started = time.perf_counter()
    fixed = sitk.ReadImage(str(case["image"]), sitk.sitkFloat32)
    votes = np.zeros((len(classes) + 1,) + tuple(reversed(fixed.GetSize())), np.int16)
    for atlas_case in train_cases:
        moving = sitk.ReadImage(str(atlas_case["image"]), sitk.sitkFloat32)
        label = sitk.ReadImage(str(atlas_case["label"]), sitk.sitkUInt8)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.05, seed=0)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 150)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        start = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                  sitk.CenteredTransformInitializerFilter.GEOMETRY)
        reg.SetInitialTransform(start, inPlace=False)
        transform = reg.Execute(fixed, moving)
        warped = sitk.GetArrayFromImage(sitk.Resample(label, fixed, transform, sitk.sitkNearestNeighbor, 0))
        for c in range(len(classes) + 1):
            votes[c] += warped == c
    pred = np.argmax(votes, axis=0).astype(np.uint8).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)
    values = np.array([0] + list(classes), np.uint8)
    return values[pred], time.perf_counter() - started


def engine_alone(case, axis, k) -> tuple[np.ndarray, float]:
    from MedSSL.tasks.fewshot.engine import segment_painted

    image, truth = read_case(case)
    painted, _ = paint_all(truth, axis, k)
    started = time.perf_counter()
    _, result = segment_painted(image.array.astype(np.float32), image.spacing, painted)
    return result.labels, time.perf_counter() - started


def corrections(draft: np.ndarray, case, axis, counts, gaps, draft_planes, prior=None) -> dict:
    """{(count, gap_mm, draft planes): (labels, seconds, planes)} after correcting the draft on the ``count``
    worst planes (draft planes: per class given to the engine, "all" for every plane beyond the gap; prior:
    the draft's (C, X, Y, Z) class probabilities, or None)."""
    from MedSSL.tasks.cohort.correction import DRAFT_PLANES, GAP_MM, correct_draft, worst_planes

    image, truth = read_case(case)
    out = {}
    for count in counts:
        planes = worst_planes(draft, truth, axis, count)
        painted = np.full(truth.shape, 255, np.uint8)
        index = [slice(None)] * 3
        index[axis] = planes
        painted[tuple(index)] = truth[tuple(index)]
        for gap in gaps or [GAP_MM]:
            for k in draft_planes or [DRAFT_PLANES]:
                started = time.perf_counter()
                labels = correct_draft(image.array.astype(np.float32), image.spacing, draft, painted, gap_mm=gap,
                                       draft_planes=None if k == "all" else int(k), prior=prior)
                out[count, gap, k] = (labels, time.perf_counter() - started, planes)
    return out


def planes_to_target(draft: np.ndarray, case, axis, classes, target: float, cap: int,
                     prior=None) -> tuple[int | None, float, list]:
    """A simulated user correcting the draft plane by plane, each time on the plane where the current result
    is worst (not one already corrected), until the mean Dice over classes reaches ``target``: (planes
    corrected, or None when ``cap`` planes were not enough; the last Dice; the planes). prior: the draft's
    class probabilities for :func:`correct_draft`, or None."""
    from MedSSL.tasks.cohort.correction import correct_draft

    image, truth = read_case(case)
    corrected = np.full(truth.shape, 255, np.uint8)
    result, planes = draft, []
    other = tuple(a for a in range(3) if a != axis)
    while True:
        score = float(np.mean(list(dice_per_class(result, truth, classes).values())))
        if score >= target or len(planes) == cap:
            return (len(planes) if score >= target else None), score, planes
        errors = (result != truth).sum(axis=other).astype(float)
        errors[planes] = -1
        plane = int(np.argmax(errors))
        planes.append(plane)
        index = [slice(None)] * 3
        index[axis] = plane
        corrected[tuple(index)] = truth[tuple(index)]
        result = correct_draft(image.array.astype(np.float32), image.spacing, draft, corrected, prior=prior)


def engine_planes_to_target(case, axis, classes, target: float, cap: int) -> dict:
    """The same count from nothing: the fewest planes (1..``cap``, spread over each structure) painted on the
    new scan for which the few-shot engine alone reaches ``target``."""
    from MedSSL.errors import MedSSLError

    started = time.perf_counter()
    truth = read_case(case)[1]
    score = 0.0
    for k in range(1, cap + 1):
        try:
            pred, _ = engine_alone(case, axis, k)
        except MedSSLError:  # too few planes for the engine
            continue
        score = float(np.mean(list(dice_per_class(pred, truth, classes).values())))
        if score >= target:
            break
    return {"arm": f"engine-to{target:g}", "planes_to_target": k if score >= target else None,
            "dice_reached": round(score, 4), "seconds": round(time.perf_counter() - started, 1)}


# ----------------------------------------------------------------------------------------------- run
def split(cases: list[dict], held_out: int | None) -> tuple[list[dict], list[dict]]:
    """(pool, held-out test subjects): without ``held_out`` every subject is in the pool; with it, a fixed
    draw (seed 2020) of ``held_out`` subjects is set aside for testing only."""
    if not held_out:
        return cases, []
    if not 0 < held_out < len(cases):
        raise SystemExit(f"--held-out {held_out}: the cohort has {len(cases)} subjects")
    order = np.random.default_rng(2020).permutation(len(cases))
    return [cases[i] for i in sorted(order[held_out:])], [cases[i] for i in sorted(order[:held_out])]


def draw(args, cases: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training subjects, test subjects) of one draw; never the same subject in both."""
    pool, held_out = split(cases, args.held_out)
    order = np.random.default_rng([seed, n]).permutation(len(pool))
    train_cases = [pool[i] for i in order[:n]]
    test_cases = held_out[:args.test] if held_out else [pool[i] for i in order[n:n + args.test]]
    return train_cases, test_cases


def unlabeled_cases(cases: list[dict], train_cases: list[dict], test_cases: list[dict]) -> list[dict]:
    """The subjects of the cohort that a draw neither trains nor tests on (the ``self`` arm's unlabelled scans)."""
    used = {c["name"] for c in train_cases + test_cases}
    return [c for c in cases if c["name"] not in used]


def run_draw(args, cases, classes, axis, n: int, seed: int, emit) -> None:
    train_cases, test_cases = draw(args, cases, n, seed)
    base = {"cohort": args.cohort if not args.quick else "phantom", "n": n, "seed": seed,
            "train": [c["name"] for c in train_cases], "init": Path(args.init).name if args.init else None,
            "transfer": args.transfer if args.init else None,
            "position": args.position, "lr": args.lr, "dice_absent": args.dice_absent,
            "patch": args.patch, "batch": args.batch, "steps": args.steps_given,
            "tilt": args.tilt, "augment": args.augment, "draft_prior": args.draft_prior}
    with tempfile.TemporaryDirectory(prefix="medssl-cohort-") as tmp:
        work = Path(tmp)
        models = {}
        kept = args.models / f"seed{seed}_n{n}" if args.models else None
        for mode in ("dense", "sparse"):
            if mode in args.arms:
                models[mode] = (kept / mode, 0.0) if kept else train(args, train_cases, axis, mode, work, seed)
        if {"cohort", "refine", "correct1", "correct2"} & set(args.arms):
            models["cohort"] = (kept / "cohort", 0.0) if kept else train(args, train_cases, axis, "painted", work, seed)
        if "self" in args.arms:
            models["self"] = (kept / "self", 0.0) if kept else train(
                args, train_cases, axis, "painted", work, seed, unlabeled_cases(cases, train_cases, test_cases))
        if args.keep_models and args.out:
            keep_models(models, args.out / "models" / f"seed{seed}_n{n}")
        for case in test_cases:
            _, truth = read_case(case)
            row = {**base, "test": case["name"]}
            for arm, (model_dir, train_s) in models.items():
                for adaptation in args.bn_adaptation:
                    score_network(args, {**row, "bn_adaptation": adaptation}, arm, model_dir, train_s, case, truth,
                                  classes, axis, emit)
            if "atlas" in args.arms:
                pred, seconds = atlas(train_cases, case, classes)
                emit({**row, "arm": "atlas", "dice": dice_per_class(pred, truth, classes), "seconds": round(seconds, 1)})
            if args.target is not None and "engine-to" in args.arms:
                emit({**row, **engine_planes_to_target(case, axis, classes, args.target, args.cap)})
            for k in (3, 5):
                if f"engine{k}" in args.arms:
                    pred, seconds = engine_alone(case, axis, k)
                    emit({**row, "arm": f"engine{k}", "dice": dice_per_class(pred, truth, classes),
                          "seconds": round(seconds, 1)})


def score_network(args, row: dict, arm: str, model_dir: Path, train_s: float, case: dict, truth, classes, axis,
                  emit) -> None:
    """Score one network arm's prediction of ``case`` (``row`` says with which ``--bn-adaptation``), and for
    the cohort arm what the other arms derive from its draft: refine, corrections, planes to the target."""
    corrects = arm == "cohort" and args.draft_prior and (
        args.target is not None or any(a.startswith("correct") for a in args.arms))
    seg, seconds = predict(model_dir, case, class_probs=corrects, bn_adaptation=row["bn_adaptation"])
    labels = seg.labels.array
    emit({**row, "arm": arm, "dice": dice_per_class(labels, truth, classes), "train_s": round(train_s, 1),
          "predict_s": round(seconds, 2)})
    if args.largest_component:
        emit({**row, "arm": f"{arm}+lcc",
              "dice": dice_per_class(largest_component_per_class(labels), truth, classes)})
    if arm == "cohort" and "refine" in args.arms:
        from MedSSL.tasks.cohort.correction import refine_draft

        image, _ = read_case(case)
        started = time.perf_counter()
        refined = refine_draft(image.array, image.spacing, labels, axis)
        emit({**row, "arm": "refine", "dice": dice_per_class(refined, truth, classes),
              "seconds": round(time.perf_counter() - started, 2)})
    if arm == "cohort" and args.target is not None:
        started = time.perf_counter()
        count, score, planes = planes_to_target(labels, case, axis, classes, args.target, args.cap,
                                                seg.class_probs)
        emit({**row, "arm": f"to{args.target:g}", "planes_to_target": count, "planes": planes,
              "dice_reached": round(score, 4), "seconds": round(time.perf_counter() - started, 1)})
    if arm == "cohort":
        wanted = [int(a[-1]) for a in args.arms if a.startswith("correct")]
        found = corrections(labels, case, axis, wanted, args.gaps, args.draft_planes, seg.class_probs)
        for (count, gap, k), (fixed, secs, planes) in found.items():
            arm_name = (f"correct{count}" + (f"@{gap:g}mm" if args.gaps and len(args.gaps) > 1 else "")
                        + (f"@draft-{k}" if args.draft_planes and len(args.draft_planes) > 1 else ""))
            emit({**row, "arm": arm_name, "dice": dice_per_class(fixed, truth, classes),
                  "planes": planes, "gap_mm": gap, "draft_planes": k, "seconds": round(secs, 2)})


def keep_models(models: dict, folder: Path) -> None:
    """Copy each arm's bundle (model.json + weights, not its checkpoints) under ``folder``/<arm>."""
    import shutil

    for arm, (model_dir, _) in models.items():
        target = folder / arm
        if not target.exists():
            shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("checkpoint*", "*.pt"))


def report(runs: list[Path], out: Path) -> dict:
    """table.md and cohort.png under ``out`` from the results.jsonl of ``runs``; returns the table."""
    rows = [json.loads(line) for run in runs for line in (run / "results.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    tables = {}
    for cohort in sorted({r["cohort"] for r in rows}):
        tables[cohort] = summarise([r for r in rows if r["cohort"] == cohort])
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for cohort, table in tables.items():
        arms = sorted({arm for cells in table.values() for arm, cell in cells.items() if "dice" in cell}, key=_arm_order)
        lines += [f"**{cohort}**: mean Dice on new scans (draws x test scans)", "",
                  "| training scans | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
        for key in sorted(table, key=lambda k: int(k.split("=")[1])):
            cells = [f"{table[key][a]['dice']:.3f} ({table[key][a]['draws']} x {table[key][a]['scans'] // table[key][a]['draws']})"
                     if a in table[key] else "" for a in arms]
            lines.append(f"| {key.split('=')[1]} | " + " | ".join(cells) + " |")
        lines.append("")
        for key in sorted(table, key=lambda k: int(k.split("=")[1])):
            for arm, cell in table[key].items():
                if "planes_median" in cell:
                    lines.append(f"n = {key.split('=')[1]}, {arm}: median {cell['planes_median']} corrected planes; "
                                 f"{cell['reached']} of {cell['scans']} scans reached the target")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines), encoding="utf-8")
    _figure(tables, out / "cohort.png")
    return tables


def _arm_order(arm: str):
    return (list(ARMS).index(arm.split("+")[0].split("@")[0]) if arm.split("+")[0].split("@")[0] in ARMS else 99, arm)


def _figure(tables: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.6), squeeze=False)
    for ax, (cohort, table) in zip(axes[0], tables.items()):
        arms = sorted({arm for cells in table.values() for arm, cell in cells.items() if "@" not in arm and "dice" in cell},
                      key=_arm_order)
        for arm in arms:
            points = sorted((int(k.split("=")[1]), cells[arm]["dice"]) for k, cells in table.items() if arm in cells)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arm)
        ax.set_title(cohort)
        ax.set_xlabel("training scans (5 painted planes each)")
        ax.set_ylabel("mean Dice on new scans")
        ax.set_xticks(sorted({int(k.split("=")[1]) for k in table}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def arm_label(r: dict) -> str:
    """The row's arm with the training variants it ran with (``cohort+steps600``, ``correct1+lr0.003``, ...);
    the atlas and the engine alone do not depend on the network and keep their names."""
    if r["arm"] == "atlas" or r["arm"].startswith("engine"):
        return r["arm"]
    pretrained = "+pretrained" + ("-encoder" if r.get("transfer") == "encoder" else "")
    return r["arm"] + (pretrained if r.get("init") else "") + (
        f"+position-{r['position']}" if r.get("position", "auto") != "auto" else "") + (
        f"+lr{r['lr']:g}" if r.get("lr") else "") + (
        f"+dice-{r['dice_absent']}" if r.get("dice_absent", "default") != "default" else "") + (
        "+patch" + "x".join(str(v) for v in r["patch"]) if r.get("patch") else "") + (
        f"+batch{r['batch']}" if r.get("batch") else "") + (f"+steps{r['steps']}" if r.get("steps") else "") + (
        f"+tilt{r['tilt']:g}" if r.get("tilt") else "") + ("+no-augment" if r.get("augment") is False else "") + (
        "+no-prior" if r.get("draft_prior") is False and r["arm"].startswith(("correct", "to")) else "") + (
        f"+bn-{r['bn_adaptation']}" if r.get("bn_adaptation", "auto") != "auto" else "")


def summarise(rows: list[dict]) -> dict:
    """Mean Dice (over classes, then test scans and draws) per (n, arm), with the spread over draws."""
    table: dict = {}
    counts: dict = {}
    for r in rows:
        key, arm = f"n={r['n']}", arm_label(r)
        if "dice" not in r:  # planes to the target Dice
            counts.setdefault(key, {}).setdefault(arm, []).append(r["planes_to_target"])
            continue
        table.setdefault(key, {}).setdefault(arm, {}).setdefault(r["seed"], []).append(float(np.mean(list(r["dice"].values()))))
    out = {key: {arm: _planes_summary(found) for arm, found in arms.items()} for key, arms in counts.items()}
    for key, arms in table.items():
        out.setdefault(key, {})
        for arm, seeds in arms.items():
            per_seed = [float(np.mean(v)) for v in seeds.values()]
            out[key][arm] = {"dice": round(float(np.mean(per_seed)), 4),
                             "seed_std": round(float(np.std(per_seed)), 4), "draws": len(per_seed),
                             "scans": sum(len(v) for v in seeds.values())}
    return out


def _planes_summary(found: list) -> dict:
    """Planes corrected until the target Dice: median over scans (a scan that never reached it counts as
    more than any), and how many scans reached it."""
    reached = [p for p in found if p is not None]
    ordered = sorted(reached) + [float("inf")] * (len(found) - len(reached))
    median = ordered[len(ordered) // 2] if len(ordered) % 2 else 0.5 * (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2])
    return {"planes_median": None if median == float("inf") else median, "reached": len(reached), "scans": len(found)}


def hardware() -> dict:
    import torch

    from MedSSL.engine.acceleration import cpu_has_native_bf16

    info = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    return {"cpu": model, "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    if args.report:
        if not args.out:
            raise SystemExit("--report needs --out (where table.md and cohort.png go)")
        print(json.dumps(report(args.report, args.out)))
        return 0
    args.steps_given = args.steps  # a variant of the rows only when asked for (not the smoke test's few steps)
    if args.quick:
        args.train, args.seeds, args.test, args.steps = [1], [0], 2, args.steps or 4
        args.width, args.planes = args.width or 4, 3
    torch.set_num_threads(args.threads)
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="medssl-cohort-") as tmp:
            args.phantom_dir = Path(tmp)
            return run(args)
    return run(args)


def run(args) -> int:
    cases, classes, axis = cohort_cases(args)
    if args.print_pool:
        print("\n".join(str(c["image"]) for c in split(cases, args.held_out)[0]))
        return 0
    rows = []
    sink = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        sink = (args.out / "results.jsonl").open("a", encoding="utf-8")

    def emit(row):
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    try:
        for seed in args.seeds:
            for n in args.train:
                run_draw(args, cases, classes, axis, n, seed, emit)
    finally:
        if sink:
            sink.close()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "phantom_dir"}
    summary = {"hardware": hardware(), "args": settings,
               "table": summarise(rows), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(summary))
    if args.out:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
