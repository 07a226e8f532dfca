"""A stand-in for the MedSSL backend CLI, used by the Slicer-side tests (copied to <tmp>/MedSSL/__main__.py).

It speaks the CLI contract (JSON-lines progress, ``medssl: error:`` + exit 2, bundle folders with model.json)
with trivial "models", so the tests check the Slicer side - files, geometry, node import - in a second,
without torch. Behaviour switches (environment): FAKE_MEDSSL_FAIL=<reason> (fail every command),
FAKE_MEDSSL_STEP_S=<seconds per step>, FAKE_MEDSSL_STEPS=<steps>, FAKE_MEDSSL_DEFAULTS=<JSON> (what
``info --defaults`` answers differently from the real backend), FAKE_MEDSSL_CHILD_PID=<file> (start a
sleeping grandchild and write its pid there), FAKE_MEDSSL_IGNORE_TERM=1 (ignore SIGTERM), FAKE_MEDSSL_TASK
(task written by finetune: segment | detect | classify).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import SimpleITK as sitk


DEFAULTS = {
    "pretrain": {"method": "genesis", "init": None, "width": 32, "patch": [64, 64, 32], "batch-size": 6,
                 "cubes-per-volume": 32, "modality": "auto", "spacing": None, "cache": None, "resume": False,
                 "compile": False, "workers": 1, "channels-last": False, "steps": 1000, "max-time": None,
                 "lr": 0.001, "optimizer": "adam", "val-every": 50, "patience": 20, "checkpoint-every": 100,
                 "no-amp": False, "device": "auto", "seed": 0, "progress": None, "threads": None},
    "finetune": {"task": "segment", "image": [], "label": [], "unlabeled": [], "csv": None, "init": None, "classes": None,
                 "width": None, "patch": None, "batch-size": 2, "modality": "auto", "spacing": None,
                 "detection": False, "no-augment": False, "val-fraction": 0.0, "resume": False, "steps": 500,
                 "max-time": None, "lr": 0.001, "optimizer": "adam", "val-every": 50, "patience": 20,
                 "checkpoint-every": 100, "no-amp": False, "transfer": "all", "bn-recalibration": 16,
                 "engine": "auto", "no-completion": False, "completion-confidence": 0.7, "position": "auto",
                 "device": "auto", "seed": 0,
                 "progress": None, "threads": None},
    "predict": {"annotation": None, "tta": False, "largest-component": False, "all-components": False, "overlap": 0.5, "window": None,
                "min-volume": 0.0, "min-score": None, "max-findings": None, "memory-mb": 1024.0, "fp32": False, "bn-adaptation": "auto",
                "device": "auto", "seed": 0, "progress": None, "threads": None},
    "suggest": {"label": None, "out": None, "count": 5, "axis": 2, "min-gap": 1, "memory-mb": 1024.0,
                "device": "auto", "seed": 0, "progress": None, "threads": None},
    "fewshot": {"steps": 300},
}
"""What the real ``medssl info --defaults`` answers (test_common_defaults.py checks they agree); the stand-in's
own options take their defaults from here. FAKE_MEDSSL_DEFAULTS='{"pretrain": {"steps": 7}}' changes some."""


def defaults():
    answer = {command: dict(options) for command, options in DEFAULTS.items()}
    for command, options in json.loads(os.environ.get("FAKE_MEDSSL_DEFAULTS") or "{}").items():
        answer[command].update(options)
    return answer


def emit(**event):
    print(json.dumps(event), flush=True)


def fail(reason):
    print(f"medssl: error: {reason}", file=sys.stderr, flush=True)
    sys.exit(2)


def read(path):
    if not os.path.exists(path):
        fail(f"{path}: no such file")
    return sitk.ReadImage(path)


def train_loop(stage):
    steps = int(os.environ.get("FAKE_MEDSSL_STEPS", "3"))
    delay = float(os.environ.get("FAKE_MEDSSL_STEP_S", "0"))
    for step in range(1, steps + 1):
        time.sleep(delay)
        emit(event="progress", step=step, total=steps, loss=1.0 / step, lr=1e-3, eta_s=delay * (steps - step),
             cubes_per_s=10.0, stage=stage)


def save_bundle(out, meta):
    os.makedirs(out, exist_ok=True)
    meta = {"format": "medssl-bundle", "format_version": 1, "architecture": {"name": "fake"}, **meta}
    with open(os.path.join(out, "model.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
    open(os.path.join(out, "weights.safetensors"), "wb").close()


def cmd_methods(args):
    print(json.dumps({"methods": [{"name": "genesis", "description": "Models Genesis"},
                                  {"name": "fake", "description": "test method"},
                                  {"name": "ark", "description": "labelled datasets", "data": "--datasets SPEC.json"}]}))


def cmd_pretrain(args):
    if args.cache:  # as the real backend: cubes cut from the scans are cached there
        os.makedirs(args.cache, exist_ok=True)
        with open(os.path.join(args.cache, "cubes.npy"), "wb") as handle:
            handle.write(b"patient-derived cubes")
    if args.datasets:
        with open(args.datasets, encoding="utf-8") as handle:
            spec = json.load(handle)
        inputs = [p for d in spec["datasets"] for c in d["cases"] for p in (c["image"], c["label"])]
        for path in inputs:
            if not os.path.exists(path):
                fail(f"{args.datasets}: {path}: no such file")
        seen = [{"name": d["name"], "classes": d["classes"],
                 "cases": [{"label_values": sorted(int(v) for v in np.unique(sitk.GetArrayFromImage(read(c["label"])))),
                            "same_grid": read(c["label"]).GetSize() == read(c["image"]).GetSize()}
                           for c in d["cases"]]} for d in spec["datasets"]]
    else:
        inputs = args.data
        for path in inputs:
            if not os.path.exists(path):
                fail(f"{path}: no such file or folder")
    emit(event="stage", stage="pretrain", message=f"{len(inputs)} inputs")
    train_loop("pretrain")
    save_bundle(args.out, {"task": "pretrain", "method": {"name": args.method},
                           "data": [os.path.basename(p) for p in inputs],
                           **({"datasets_seen": seen} if args.datasets else {})})
    emit(event="done", bundle=args.out)


def cmd_finetune(args):
    if len(args.image) != len(args.label):
        fail("--image/--label: give them in pairs")
    for image_path, label_path in zip(args.image, args.label):  # several pairs: the cohort model
        image, label = read(image_path), read(label_path)
        same = (image.GetSize() == label.GetSize()
                and np.allclose(image.GetSpacing(), label.GetSpacing(), atol=1e-9)
                and np.allclose(image.GetOrigin(), label.GetOrigin(), atol=1e-9)
                and np.allclose(image.GetDirection(), label.GetDirection(), atol=1e-9))
        if not same:
            fail(f"{label_path}: the label is not on the image's grid")
    with open(args.classes, encoding="utf-8") as handle:
        classes = json.load(handle)
    labels = sitk.GetArrayFromImage(label)  # (k, j, i)
    annotated = [int(k) for k in range(labels.shape[0]) if (labels[k] != 255).any()]
    train_loop("finetune")
    task = os.environ.get("FAKE_MEDSSL_TASK", "segment")
    if args.detection:
        task = "detect"
    for path in args.unlabeled:
        if not os.path.exists(path):
            fail(f"--unlabeled {path}: no such file or folder")
    save_bundle(args.out, {"task": task, "classes": classes, "init": args.init, "images": len(args.image),
                           "unlabeled": len(args.unlabeled),
                           "engine": args.engine,
                           "annotated_slices": annotated,
                           "annotated_planes": {"ijk"[2 - axis]: [int(s) for s in range(labels.shape[axis])
                                                                if (labels.take(s, axis=axis) != 255).all()]
                                                for axis in range(3)},
                           "label_values": sorted(int(v) for v in np.unique(labels))})
    emit(event="done", bundle=args.out)


def fake_labels(values):
    labels = np.zeros(values.shape, np.uint8)
    labels[values > 0] = 1  # the tests' volumes: positive voxels are "class 1"
    labels[values > 100] = 2
    return labels


def predict_many(args):
    """Several scans (or a folder): ``<out>/<name>.nii.gz`` each and a summary.csv, a stage per scan."""
    sources = []
    for path in args.image:
        sources += sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
    os.makedirs(args.out, exist_ok=True)
    rows = ["image,labels"]
    for i, source in enumerate(sources, start=1):
        name = os.path.basename(source).split(".")[0]
        emit(event="stage", stage="predict", message=f"scan {i} of {len(sources)}: {name}")
        image = read(source)
        out = sitk.GetImageFromArray(fake_labels(sitk.GetArrayFromImage(image)))
        out.CopyInformation(image)
        sitk.WriteImage(out, os.path.join(args.out, f"{name}.nii.gz"))
        rows.append(f"{os.path.basename(source)},{name}.nii.gz")
    with open(os.path.join(args.out, "summary.csv"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")
    emit(event="done", outputs={"summary": os.path.join(args.out, "summary.csv"), "scans": len(sources)})


def cmd_predict(args):
    with open(os.path.join(args.model, "model.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    if len(args.image) > 1 or os.path.isdir(args.image[0]):
        return predict_many(args)
    args.image = args.image[0]
    image = read(args.image)
    values = sitk.GetArrayFromImage(image)
    with open(args.out + ".args.json", "w", encoding="utf-8") as handle:
        json.dump(vars(args), handle)
    emit(event="progress", step=1, total=1, loss=0.0, lr=0.0, eta_s=0.0, cubes_per_s=1.0, stage="predict")
    if meta["task"] == "classify":
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"probabilities": {"normal": 0.25, "abnormal": 0.75}, "label": 1, "name": "abnormal"}, handle)
        emit(event="done", outputs={"classification": args.out})
        return
    labels = fake_labels(values)
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    sitk.WriteImage(out, args.out)
    outputs = {"labelmap": args.out}
    if args.detections:
        findings = []
        for value in (2, 1):
            k, j, i = np.nonzero(labels == value)
            if len(i):
                center = image.TransformContinuousIndexToPhysicalPoint([float(i.mean()), float(j.mean()), float(k.mean())])
                findings.append({"label": value, "name": meta["classes"][str(value)]["name"], "center_mm": list(center),
                                 "score": 0.9 if value == 2 else 0.6, "volume_mm3": float(len(i) * np.prod(image.GetSpacing())),
                                 "bbox_mm": [list(center), list(center)]})
        extra = int(os.environ.get("FAKE_MEDSSL_FINDINGS", "0"))  # a detector that floods: many weak/small findings
        for n in range(extra):
            center = image.TransformContinuousIndexToPhysicalPoint([1.0, 1.0, float(n % values.shape[0])])
            findings.append({"label": 1, "name": meta["classes"]["1"]["name"], "center_mm": list(center),
                             "score": round(0.95 - 0.9 * n / max(1, extra), 4), "volume_mm3": 5.0 if n % 3 else 40.0,
                             "bbox_mm": [list(center), list(center)]})
        with open(args.detections, "w", encoding="utf-8") as handle:
            json.dump(findings, handle)
        outputs["detections"] = args.detections
    emit(event="done", outputs=outputs)


def cmd_suggest(args):
    image = read(args.image)
    values = sitk.GetArrayFromImage(image)
    scores = values.reshape(values.shape[0], -1).astype(float).std(axis=1)
    if args.label:  # annotated slices are not suggested again
        labels = sitk.GetArrayFromImage(read(args.label))
        scores[[k for k in range(labels.shape[0]) if (labels[k] != 255).any()]] = -1.0
    order = np.argsort(-scores)[: args.count]
    size = image.GetSize()
    slices = []
    for k in order:
        center = image.TransformContinuousIndexToPhysicalPoint([(size[0] - 1) / 2, (size[1] - 1) / 2, float(k)])
        slices.append({"axis": 2, "index": int(k), "score": float(scores[k]), "center_mm": list(center)})
    answer = {"slices": slices}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(answer, handle)
    print(json.dumps(answer))


def cmd_info(args):
    if not args.defaults:
        fail("info: the stand-in only answers --defaults")
    print(json.dumps(defaults(), indent=2))


def cmd_sleep(args):
    """Used by the cancel tests: progress forever, with a grandchild in the same process group."""
    if os.environ.get("FAKE_MEDSSL_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pid_file = os.environ.get("FAKE_MEDSSL_CHILD_PID")
    if pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
        with open(pid_file, "w", encoding="utf-8") as handle:
            handle.write(str(child.pid))
    step = 0
    while True:
        step += 1
        emit(event="progress", step=step, total=10**6, loss=1.0, lr=0.0, eta_s=1e6, cubes_per_s=1.0, stage="sleep")
        time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser(prog="medssl")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    for flag in ("--progress", "--device", "--seed", "--steps", "--max-time", "--width", "--init", "--parent-pid"):
        common.add_argument(flag)
    p = sub.add_parser("methods", parents=[common])
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("pretrain", parents=[common])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+")
    source.add_argument("--datasets")
    p.add_argument("--method", default="genesis")
    p.add_argument("--out", required=True)
    p.add_argument("--cache")
    p = sub.add_parser("finetune", parents=[common])
    for flag in ("--image", "--label"):
        p.add_argument(flag, required=True, action="append")
    for flag in ("--classes", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--detection", action="store_true")
    p.add_argument("--engine")
    p.add_argument("--unlabeled", nargs="+", default=[])
    p = sub.add_parser("predict", parents=[common])
    for flag in ("--model", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--image", required=True, nargs="+")
    p.add_argument("--detections")
    p.add_argument("--annotation")
    p = sub.add_parser("suggest", parents=[common])
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--count", type=int, default=defaults()["suggest"]["count"])
    p.add_argument("--axis", type=int, default=defaults()["suggest"]["axis"])
    p.add_argument("--label")
    p.add_argument("--out")
    p = sub.add_parser("info")
    p.add_argument("model", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--defaults", action="store_true")
    sub.add_parser("sleep", parents=[common])
    args = parser.parse_args()
    if os.environ.get("FAKE_MEDSSL_FAIL"):
        fail(os.environ["FAKE_MEDSSL_FAIL"])
    globals()["cmd_" + args.command](args)


if __name__ == "__main__":
    main()
