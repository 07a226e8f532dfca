"""Does bf16 on the CPU cost accuracy? fp32 against bf16 autocast, for training and for prediction.

On a CPU with native bf16 (AVX512-BF16 or AMX) the default precision is bf16 autocast
(``MedSSL/engine/acceleration.py``) both for training (``--no-amp``: fp32) and for the network in
``medssl predict`` (``--fp32``: fp32). This benchmark runs both through the real commands on the real
cases of ``../shared/data`` (skipped cleanly when it is absent):

* fine-tuning (``medssl finetune --engine network``): every case of ``fewshot_cases.py``, every other
  plane painted along the case's axis, a width-``--width`` U-Net from scratch for ``--steps`` steps
  (same seed) in each precision, then ``medssl predict --fp32``; the score is the Dice on the planes
  that were not painted;
* prediction: the fp32-trained model of each case predicted again with the default (bf16) network:
  the Dice change and the share of voxels whose label changed;
* pretraining (``medssl pretrain``, Models Genesis): the CT volumes, ``--pretrain-steps`` steps; the
  score is the best validation loss (restoration MSE on the held-out cubes, same cubes for both).

Per run: the score, the training seconds and the step count (from the bundle's model.json). The last
stdout line is JSON: every record, the mean paired difference (bf16 - fp32) and the machine.

    python Testing/Benchmarks/bench_precision.py            # about 30 min on 2 cores
    python Testing/Benchmarks/bench_precision.py --cases spleen_ct --steps 20 --pretrain-steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_label_efficiency import medssl  # noqa: E402  (one command in this process: (status, seconds))
from fewshot_cases import DATA, dice_unpainted, every_other, load_cases  # noqa: E402

ARMS = {"bf16": [], "fp32": ["--no-amp"]}
CT_VOLUMES = ["itkelastix_thorax_ct/thorax_ct_00_2xdown.nii.gz", "totalseg_examples/example_ct.nii.gz",
              "totalseg_examples/aorta_report/ct_cropped.nii.gz", "msd_spleen_ivadomed/sub-spleen2_ct.nii.gz"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def training_record(bundle: Path) -> dict:
    training = json.loads((bundle / "model.json").read_text(encoding="utf-8"))["training"]
    return {k: training.get(k) for k in ("steps", "seconds", "precision", "best_val_loss")}


def finetune_case(case, arm: str, args, tmp: Path) -> dict:
    from MedSSL.io.volumes import Volume, read_volume, write_volume

    folder = tmp / f"{case.name}_{arm}"
    folder.mkdir(parents=True)
    sparse, painted = every_other(case.truth, case.axis)
    write_volume(Volume(case.image, case.spacing, np.zeros(3), np.eye(3)), folder / "image.nii.gz")
    write_volume(Volume(sparse, case.spacing, np.zeros(3), np.eye(3)), folder / "painted.nii.gz")
    classes = ",".join(f"{k}={v}" for k, v in case.classes.items())
    logfile = folder / "log.txt"
    status, _ = medssl(["finetune", "--engine", "network", "--image", str(folder / "image.nii.gz"), "--label",
                       str(folder / "painted.nii.gz"), "--classes", classes, "--out", str(folder / "model"),
                       "--width", str(args.width), "--steps", str(args.steps), "--seed", str(args.seed),
                       "--progress", "none", *ARMS[arm]], logfile)
    if status != 0:
        raise SystemExit(f"{case.name} {arm}: finetune failed (exit {status}); see {logfile}")
    predictions = {}
    for predict_arm, extra in (("fp32", ["--fp32"]), ("default", [])):
        if predict_arm == "default" and arm != "fp32":
            continue
        out = folder / f"prediction_{predict_arm}.nii.gz"
        status, seconds = medssl(["predict", "--model", str(folder / "model"), "--image", str(folder / "image.nii.gz"),
                                  "--out", str(out), "--progress", "none", *extra], logfile)
        if status != 0:
            raise SystemExit(f"{case.name} {arm}: predict failed (exit {status}); see {logfile}")
        predictions[predict_arm] = (read_volume(out).array, round(seconds, 1))
    prediction, predict_s = predictions["fp32"]
    record = {"case": case.name, "arm": arm, "dice_unpainted": round(dice_unpainted(prediction, case.truth, case.axis,
                                                                                    painted), 4),
              "predict_fp32_s": predict_s, **training_record(folder / "model"), "load": round(os.getloadavg()[0], 2)}
    if "default" in predictions:
        low, low_s = predictions["default"]
        record.update(predict_default_s=low_s, predict_default_dice_unpainted=round(
            dice_unpainted(low, case.truth, case.axis, painted), 4),
            predict_default_changed_voxels=round(float((low != prediction).mean()), 6))
    log(f"finetune {case.name} {arm}: Dice {record['dice_unpainted']}, {record['seconds']} s for "
        f"{record['steps']} steps ({record['precision']})"
        + (f"; predicted with the default precision: Dice {record['predict_default_dice_unpainted']}, "
           f"{record['predict_default_changed_voxels']:.4%} of the labels changed, {low_s} s vs {predict_s} s"
           if "default" in predictions else ""))
    return record


def pretrain_arm(arm: str, args, tmp: Path) -> dict:
    folder = tmp / f"pretrain_{arm}"
    folder.mkdir(parents=True)
    data = [str(DATA / v) for v in CT_VOLUMES if (DATA / v).is_file()]
    status, _ = medssl(["pretrain", *sum((["--data", d] for d in data), []), "--out", str(folder / "model"), "--cache",
                       str(tmp / "cubes"), "--width", str(args.width), "--steps", str(args.pretrain_steps),
                       "--val-every", str(max(1, args.pretrain_steps // 4)), "--seed", str(args.seed),
                       "--progress", "none", *ARMS[arm]], folder / "log.txt")
    if status != 0:
        raise SystemExit(f"pretrain {arm}: failed (exit {status}); see {folder / 'log.txt'}")
    record = {"arm": arm, **training_record(folder / "model"), "load": round(os.getloadavg()[0], 2)}
    log(f"pretrain {arm}: best validation loss {record['best_val_loss']:.5f}, {record['seconds']} s for "
        f"{record['steps']} steps ({record['precision']})")
    return record


def paired(records: list[dict], key: str, by: str | None) -> dict:
    """Mean and range of bf16 - fp32 of ``key`` over the pairs (matched on ``by``)."""
    groups: dict = {}
    for r in records:
        groups.setdefault(r.get(by) if by else None, {})[r["arm"]] = r
    diffs = [g["bf16"][key] - g["fp32"][key] for g in groups.values() if "bf16" in g and "fp32" in g]
    speed = [g["fp32"]["seconds"] / g["bf16"]["seconds"] for g in groups.values() if "bf16" in g and "fp32" in g]
    return {"pairs": len(diffs), f"mean_{key}_bf16_minus_fp32": round(float(np.mean(diffs)), 5) if diffs else None,
            "min": round(float(np.min(diffs)), 5) if diffs else None, "max": round(float(np.max(diffs)), 5) if diffs else None,
            "fp32_over_bf16_seconds": round(float(np.mean(speed)), 2) if speed else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=None, help="few-shot suite cases (default: all)")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run (default 150)")
    ap.add_argument("--pretrain-steps", type=int, default=60, help="pretraining steps per run (default 60; 0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cases = load_cases(names=args.cases)
    if not cases:
        log(f"{DATA} is absent: nothing to measure")
        print(json.dumps({"skipped": f"{DATA} absent"}))
        return 0
    from MedSSL.engine.acceleration import cpu_has_native_bf16

    import torch

    if not cpu_has_native_bf16():
        log("this CPU has no native bf16: both arms would train in fp32")
    result = {"hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__},
              "settings": vars(args), "finetune": [], "pretrain": []}
    with tempfile.TemporaryDirectory(prefix="medssl_precision_") as tmp:
        for case in cases:
            for arm in ARMS:
                result["finetune"].append(finetune_case(case, arm, args, Path(tmp)))
        if args.pretrain_steps:
            for arm in ARMS:
                result["pretrain"].append(pretrain_arm(arm, args, Path(tmp)))
    fp32_models = [r for r in result["finetune"] if "predict_default_dice_unpainted" in r]
    predict_change = [r["predict_default_dice_unpainted"] - r["dice_unpainted"] for r in fp32_models]
    result["summary"] = {"finetune": paired(result["finetune"], "dice_unpainted", "case"),
                         "predict": {"models": len(fp32_models),
                                     "mean_dice_default_minus_fp32": round(float(np.mean(predict_change)), 5),
                                     "largest_dice_change": round(float(np.max(np.abs(predict_change))), 5),
                                     "mean_changed_voxels": round(float(np.mean(
                                         [r["predict_default_changed_voxels"] for r in fp32_models])), 6),
                                     "fp32_over_default_seconds": round(float(np.mean(
                                         [r["predict_fp32_s"] / r["predict_default_s"] for r in fp32_models])), 2)}
                         if fp32_models else None,
                         "pretrain": paired(result["pretrain"], "best_val_loss", None) if result["pretrain"] else None}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
