"""PNG figures of evaluation results (matplotlib's Agg canvas; pyplot and its global state unused).

Each ``*_png`` function returns the PNG bytes; :func:`write_png` writes them atomically.
"""

from __future__ import annotations

import io

from MedSSL.io.output import atomic_write_bytes


def _figure(width=6.0, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def dice_png(result: dict, title: str = "Dice per class") -> bytes:
    """Bar chart of per-class Dice (classes absent from both volumes greyed)."""
    per_class = result.get("per_class", {})
    labels = list(per_class)
    names = [f"{k}\n{v['name']}" if v.get("name") else k for k, v in per_class.items()]
    values = [per_class[k]["dice"] or 0.0 for k in labels]
    colours = ["tab:blue" if per_class[k]["scored"] else "lightgrey" for k in labels]
    fig = _figure(max(4.0, 0.6 * len(labels) + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(labels)), values, color=colours)
    for x, v in enumerate(values):
        ax.text(x, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("class (label value)")
    ax.set_ylabel("Dice")
    mean = result.get("mean_dice")
    ax.set_title(title + (f" (mean {mean:.3f})" if mean is not None else ""))
    if mean is not None:
        ax.axhline(mean, color="tab:red", linestyle="--", linewidth=1)
    fig.tight_layout()
    return _png(fig)


def froc_png(result: dict) -> bytes:
    """FROC curve (sensitivity against false positives per scan, log x axis) with the reported points."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    curve = [c for c in result.get("curve", []) if c["sensitivity"] is not None]
    if curve:
        xs = [max(c["fp_per_scan"], 1e-3) for c in curve] + [max(16.0, curve[-1]["fp_per_scan"])]
        ys = [c["sensitivity"] for c in curve] + [curve[-1]["sensitivity"]]  # flat beyond the last threshold
        ax.step(xs, ys, where="post", color="tab:blue", label="FROC")
    points = [(float(k), v) for k, v in result.get("froc", {}).items() if v is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", color="tab:red",
                label=f"mean sensitivity {result.get('mean_sensitivity', 0):.3f}")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlim(0.1, 16)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"FROC: {result.get('lesions', 0)} lesion(s), {result.get('scans', 0)} scan(s)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def roc_png(result: dict) -> bytes:
    """ROC curve(s): one for a binary result, one per class for a multi-class one."""
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    if "per_class" in result:
        curves = [(name, v["roc"], v["auc"]) for name, v in result["per_class"].items()]
    else:
        curves = [("positive", result["roc"], result["auc"])]
    for name, roc, auc in curves:
        label = f"{name} (AUC {auc:.3f})" if auc is not None else f"{name} (AUC n/a)"
        ax.plot([p[0] for p in roc], [p[1] for p in roc], label=label)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    auc = result.get("auc")
    ax.set_title("ROC" + (f" (AUC {auc:.3f})" if auc is not None else ""))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def write_png(path, data: bytes) -> None:
    """Write PNG bytes to ``path`` through a temporary file in the same folder and a rename."""
    atomic_write_bytes(path, data)


def painted_result_png(image, painted, prediction, truth, axis: int, slices, names: dict, title: str,
                       window=(-160.0, 240.0)) -> bytes:
    """A row of slices along ``axis``: the image (gray, ``window`` in its units), the painted contours
    (on painted slices), the prediction and the truth, one colour per kind, with a legend.

    image, painted, prediction, truth: (X, Y, Z) arrays on one grid (painted: 255 = not annotated);
    slices: indices along ``axis`` to show; names: {class value: name} (contours of every class drawn).
    """
    import numpy as np
    from matplotlib.lines import Line2D

    slices = list(slices)
    fig = _figure(2.6 * len(slices), 3.2)
    kinds = (("painted", "#ffd23f", "-"), ("prediction", "#3fa7ff", "-"), ("truth", "#ff4f4f", "--"))
    for n, index in enumerate(slices):
        ax = fig.add_subplot(1, len(slices), n + 1)
        take = lambda a: np.take(a, index, axis=axis).T  # noqa: E731  rows = second remaining axis
        ax.imshow(take(image), cmap="gray", vmin=window[0], vmax=window[1], origin="lower", interpolation="nearest")
        plane_painted = take(painted)
        layers = [(take(prediction), kinds[1], 1.2), (take(truth), kinds[2], 1.2),
                  (np.where(plane_painted == 255, 0, plane_painted), kinds[0], 2.4)]
        for labels, (_, colour, style), width in layers:
            for value in names:
                mask = (labels == value).astype(float)
                if mask.any() and not mask.all():
                    ax.contour(mask, levels=[0.5], colors=[colour], linestyles=[style], linewidths=width)
        is_painted = bool(np.all(plane_painted != 255))
        ax.set_title(f"slice {index}" + (" (painted)" if is_painted else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([0], [0], color=c, linestyle=s, label=k) for k, c, s in kinds]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.82, bottom=0.12, wspace=0.04)
    return _png(fig)
