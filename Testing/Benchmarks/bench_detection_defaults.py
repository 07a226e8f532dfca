"""How the default detection filter (MedSSL.tasks.infer.detect: DEFAULT_MIN_SCORE, DEFAULT_MIN_VOLUME_MM3,
DEFAULT_MAX_FINDINGS) was chosen: FROC of a detector fine-tuned the way a clinician would, on real data.

Data: shared/data/totalseg_examples/example_ct.nii.gz (abdomen-pelvis CT, 3 mm) with its
TotalSegmentator labels (model output, not manual): the vertebrae T9..S1 present are the "lesions" (one
finding per vertebra expected). A detector is fine-tuned on three painted axial slices (each through a
different vertebra; 255 elsewhere) with `medssl finetune --detection`, applied to the same scan with
`medssl predict --detections` (the network engine, as in the reported flood: no few-shot clean-up, which
would keep only components touching the painting), and every component it returns is scored: a finding is a hit when its
centre falls in a vertebra, each vertebra counts once, anything else is a false positive.

For each (minimum score, minimum volume) it reports sensitivity, false positives and the number of
findings a reader would see; the cap (DEFAULT_MAX_FINDINGS) then bounds what is shown.

    python Testing/Benchmarks/bench_detection_defaults.py --work /tmp/froc [--steps 150 --width 8]

Status: the defaults are not FROC-tuned yet. On this project's 2 shared CPU cores, 150 steps did not finish
in 15 minutes; 40 steps (width 8) gave 37 findings, none in a vertebra, at every setting (minimum volume
100 mm3 and the cap of 10 left 10 of them). A detector that finds something is needed (a GPU run, or the
few-shot engine with --detection once its components are separated) before this sweep can pick thresholds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "totalseg_examples"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    classmap = json.loads((args.data / "totalsegmentator_classmap.json").read_text(encoding="utf-8"))["total"]
    vertebrae = {int(k) for k, v in classmap.items() if v.startswith("vertebrae_")}
    image = sitk.ReadImage(str(args.data / "example_ct.nii.gz"))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(args.data / "example_seg_fast_force_split.nii.gz")))
    present = sorted(v for v in vertebrae if (seg == v).any())
    truth = np.isin(seg, present)
    # three axial slices, each through the middle of a different vertebra
    centres = {v: int(round(np.nonzero(seg == v)[0].mean())) for v in present}
    picks = [centres[present[i]] for i in (1, len(present) // 2, len(present) - 2)]
    label = np.full(seg.shape, 255, np.uint8)
    for z in picks:
        label[z] = truth[z].astype(np.uint8)
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(image)
    sitk.WriteImage(label_image, str(args.work / "painted.nii.gz"))
    sitk.WriteImage(image, str(args.work / "ct.nii.gz"))
    run = [sys.executable, "-m", "MedSSL"]
    budget = ["--steps", str(args.steps), "--width", str(args.width), "--engine", "network"]
    subprocess.run(run + ["finetune", "--image", str(args.work / "ct.nii.gz"), "--label", str(args.work / "painted.nii.gz"),
                          "--classes", "1=vertebra", "--detection", "--out", str(args.work / "model"), "--device", "cpu",
                          "--progress", "none", *budget], check=True)
    subprocess.run(run + ["predict", "--model", str(args.work / "model"), "--image", str(args.work / "ct.nii.gz"),
                          "--out", str(args.work / "pred.nii.gz"),
                          "--detections", str(args.work / "det.json"), "--device", "cpu", "--progress", "none"],
                   check=True)
    found = json.loads((args.work / "det.json").read_text(encoding="utf-8"))
    hits = []
    for finding in found:
        index = image.TransformPhysicalPointToIndex([float(c) for c in finding["center_mm"]])
        inside = all(0 <= i < n for i, n in zip(index, image.GetSize()))
        value = int(seg[index[2], index[1], index[0]]) if inside else 0
        hits.append(value if value in present else 0)
    print(f"{len(found)} findings from the detector; {len(present)} vertebrae in the scan; painted z = {picks}")
    rows = []
    for min_score in (0.0, 0.3, 0.5, 0.7, 0.9):
        for min_volume in (0.0, 20.0, 100.0, 500.0, 2000.0):
            kept = [(f, h) for f, h in zip(found, hits) if f["score"] >= min_score and f["volume_mm3"] >= min_volume]
            kept.sort(key=lambda fh: -fh[0]["score"])
            for cap in (None, 10):
                shown = kept if cap is None else kept[:cap]
                tp = len({h for _, h in shown if h})
                fp = sum(1 for _, h in shown if not h)
                rows.append({"min_score": min_score, "min_volume_mm3": min_volume, "cap": cap, "shown": len(shown),
                             "vertebrae_found": tp, "sensitivity": round(tp / len(present), 3), "false_positives": fp})
    print(f"{'score>=':>8} {'mm3>=':>7} {'cap':>4} {'shown':>6} {'found':>6} {'sens':>6} {'FP':>5}")
    for r in rows:
        print(f"{r['min_score']:>8} {r['min_volume_mm3']:>7} {str(r['cap']):>4} {r['shown']:>6} {r['vertebrae_found']:>6} "
              f"{r['sensitivity']:>6} {r['false_positives']:>5}")
    (args.work / "froc.json").write_text(json.dumps({"findings": len(found), "vertebrae": len(present), "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
