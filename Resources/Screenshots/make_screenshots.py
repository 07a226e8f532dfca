"""Make the extension's screenshot (CMakeLists.txt EXTENSION_SCREENSHOTURLS) from real data with the tool.

MSD spleen crop (shared/data/msd_spleen_ivadomed: CT, expert spleen label). Two axial slices of the spleen
are "painted" (the expert label on those two slices, 255 elsewhere: what the Slicer module writes for two
painted axial slices), `medssl finetune` learns from them and `medssl predict --annotation` segments the
whole scan, as the MedSSL Trainer module does on "Fine-tune and segment". The picture shows a painted slice,
an unpainted slice and a sagittal reformat with the prediction (red) against the expert outline (green), and
the Dice of the whole volume.

    python Resources/Screenshots/make_screenshots.py [--data DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data" / "msd_spleen_ivadomed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "MedSSLTrainer_fewshot_spleen.png")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="medssl-screenshot-"))
    work.mkdir(parents=True, exist_ok=True)
    ct_path = args.data / "sub-spleen2_ct.nii.gz"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(args.data / "sub-spleen2_ct_seg-manual.nii.gz"))) > 0
    ct = sitk.ReadImage(str(ct_path))
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    painted = [int(zs[len(zs) // 4]), int(zs[(3 * len(zs)) // 4])]
    label = np.full(truth.shape, 255, np.uint8)
    for z in painted:
        label[z] = truth[z]
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(ct)
    sitk.WriteImage(label_image, str(work / "painted.nii.gz"))
    medssl = [sys.executable, "-m", "MedSSL"]
    subprocess.run(medssl + ["finetune", "--image", str(ct_path), "--label", str(work / "painted.nii.gz"), "--classes",
                             "1=spleen", "--out", str(work / "model"), "--device", "cpu", "--progress", "none"], check=True)
    subprocess.run(medssl + ["predict", "--model", str(work / "model"), "--image", str(ct_path), "--annotation",
                             str(work / "painted.nii.gz"), "--out", str(work / "pred.nii.gz"), "--device", "cpu",
                             "--progress", "none"], check=True)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "pred.nii.gz"))) > 0
    dice = 2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())
    unpainted = [z for z in zs if z not in painted]
    middle = int(unpainted[len(unpainted) // 2])
    array = sitk.GetArrayFromImage(ct).astype(np.float32)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spacing = ct.GetSpacing()
    window = dict(cmap="gray", vmin=-160, vmax=240)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    panels = [(array[painted[0]], truth[painted[0]], None, f"painted axial slice z={painted[0]} (1 of 2)", 1.0),
              (array[middle], truth[middle], pred[middle], f"unpainted axial slice z={middle}", 1.0)]
    column = int(np.flatnonzero(truth.any(axis=(0, 1))).mean())
    panels.append((array[:, :, column], truth[:, :, column], pred[:, :, column], f"sagittal reformat x={column}",
                   spacing[2] / spacing[1]))
    for ax, (image, ref, out, title, aspect) in zip(axes, panels):
        ax.imshow(image, aspect=aspect, origin="lower" if aspect != 1.0 else "upper", **window)
        if out is None:
            ax.imshow(np.ma.masked_where(~ref, ref), cmap="autumn", alpha=0.45, aspect=aspect,
                      origin="lower" if aspect != 1.0 else "upper")
        else:
            ax.contour(ref, levels=[0.5], colors="lime", linewidths=1.2, origin="lower" if aspect != 1.0 else "upper")
            ax.contour(out, levels=[0.5], colors="red", linewidths=1.2, origin="lower" if aspect != 1.0 else "upper")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"MedSSL few-shot segmentation: spleen from 2 painted slices (MSD spleen crop); red: MedSSL, "
                 f"green: expert; Dice {dice:.3f} over the volume", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"{args.out}: painted z={painted}, Dice {dice:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
