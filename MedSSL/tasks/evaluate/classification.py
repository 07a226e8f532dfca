"""ROC AUC of classification scores, computed with the rank (Mann-Whitney) statistic.

Input format (``medssl evaluate --classification RESULTS.csv``): a CSV file with a header row.

* Binary: columns ``truth`` (0 or 1) and ``score`` (higher = more likely 1).
* Several classes: column ``truth`` holding class names, and one column of scores (probabilities)
  per class, named as the classes: ``truth,liver,spleen,kidney``. Each class gets a one-vs-rest AUC;
  ``auc`` is their unweighted mean (macro average) over the classes that have both positive and
  negative cases.
* Columns named ``image``, ``id``, ``case``, ``name``, ``file`` or ``path`` (any case) are identifiers
  and ignored. Blank lines are skipped.

AUC = P(score of a random positive > score of a random negative) + 0.5 P(tie), i.e. the area under the
ROC curve with ties handled by averaged ranks.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from MedSSL.errors import MedSSLError

ID_COLUMNS = {"image", "id", "case", "name", "file", "path"}


def roc_auc(truth, scores) -> float:
    """ROC AUC of binary ``truth`` (0/1 or bool) against ``scores``; NaN when one class is absent."""
    from scipy.stats import rankdata

    truth = np.asarray(truth).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(truth.sum())
    n_neg = int(truth.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # ties get their average rank
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(truth, scores) -> list[list[float]]:
    """ROC points [[fpr, tpr], ...] from (0, 0) to (1, 1), one per distinct score threshold."""
    truth = np.asarray(truth).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    truth, scores = truth[order], scores[order]
    n_pos, n_neg = max(int(truth.sum()), 1), max(int((~truth).sum()), 1)
    tp = np.cumsum(truth)
    fp = np.cumsum(~truth)
    last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1] if scores.size else np.array([], int)
    points = [[0.0, 0.0]] + [[float(fp[i] / n_neg), float(tp[i] / n_pos)] for i in last]
    return points


def read_classification_csv(path) -> tuple[list[str], np.ndarray, list[str] | None]:
    """(truth values as strings, scores (N, C), class names or None for the binary ``score`` form)."""
    p = Path(path)
    if not p.is_file():
        raise MedSSLError(f"{path}: no such file")
    try:
        with p.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MedSSLError(f"{path}: not a readable CSV file ({exc.__class__.__name__})") from None
    if len(rows) < 2:
        raise MedSSLError(f"{path}: needs a header row (truth,score or truth,<class>...) and at least one data row")
    header = [cell.strip() for cell in rows[0]]
    lower = [h.lower() for h in header]
    if "truth" not in lower:
        raise MedSSLError(f"{path}: no 'truth' column in the header {header}")
    truth_col = lower.index("truth")
    score_cols = [i for i, h in enumerate(lower) if i != truth_col and h not in ID_COLUMNS]
    if not score_cols:
        raise MedSSLError(f"{path}: no score column (expected 'score' or one column per class)")
    binary = len(score_cols) == 1 and lower[score_cols[0]] == "score"
    truth, scores = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise MedSSLError(f"{path}: line {n} has {len(row)} fields, the header has {len(header)}")
        truth.append(row[truth_col].strip())
        try:
            values = [float(row[i]) for i in score_cols]
        except ValueError:
            raise MedSSLError(f"{path}: line {n} has a non-numeric score") from None
        if not all(math.isfinite(v) for v in values):
            raise MedSSLError(f"{path}: line {n} has a NaN or infinite score")
        scores.append(values)
    scores = np.asarray(scores, dtype=np.float64)
    if binary:
        bad = sorted({t for t in truth if t not in ("0", "1", "0.0", "1.0")})
        if bad:
            raise MedSSLError(f"{path}: with a 'score' column, truth must be 0 or 1 (found {bad[0]!r})")
        return ["1" if t in ("1", "1.0") else "0" for t in truth], scores, None
    classes = [header[i] for i in score_cols]
    unknown = sorted(set(truth) - set(classes))
    if unknown:
        raise MedSSLError(f"{path}: truth value {unknown[0]!r} is not one of the class columns {classes}")
    return truth, scores, classes


def classification_metrics(truth, scores, classes=None) -> dict:
    """ROC AUC (and ROC curves) of binary or one-vs-rest multi-class scores.

    Binary (``classes`` None): truth 0/1 (or "0"/"1"), scores (N,) or (N, 1) -> ``{"auc", "n",
    "positives", "negatives", "roc"}``. Multi-class: truth holds class names, scores (N, C) in the order
    of ``classes`` -> ``{"auc" (macro mean), "per_class": {name: {"auc", "positives", "roc"}}, "n"}``.
    AUCs that cannot be computed (a class with no positive or no negative case) are None.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = [str(t) for t in truth]
    n = len(truth)
    if classes is None:
        positive = np.array([t in ("1", "1.0", "True", "true") for t in truth])
        s = scores.reshape(n, -1)[:, 0]
        auc = roc_auc(positive, s)
        return {"auc": auc if math.isfinite(auc) else None, "n": n, "positives": int(positive.sum()),
                "negatives": int(n - positive.sum()), "roc": roc_curve(positive, s)}
    per_class = {}
    for c, name in enumerate(classes):
        positive = np.array([t == str(name) for t in truth])
        auc = roc_auc(positive, scores[:, c])
        per_class[str(name)] = {"auc": auc if math.isfinite(auc) else None, "positives": int(positive.sum()),
                                "roc": roc_curve(positive, scores[:, c])}
    defined = [v["auc"] for v in per_class.values() if v["auc"] is not None]
    return {"auc": float(np.mean(defined)) if defined else None, "per_class": per_class, "n": n}


def evaluate_classification_file(path) -> dict:
    """:func:`classification_metrics` of a results CSV (see the module docstring for the format);
    MedSSLError when no AUC can be computed."""
    truth, scores, classes = read_classification_csv(path)
    result = classification_metrics(truth, scores, classes)
    if result["auc"] is None:
        raise MedSSLError(f"{path}: AUC needs both positive and negative cases (all truths are the same)")
    return result
