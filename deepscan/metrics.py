"""Detection metrics at frame and video level, computed by scikit-learn as the field does.

- AUC: ``sklearn.metrics.roc_auc_score``.
- AP: ``sklearn.metrics.average_precision_score`` (step-wise precision-recall area; tied scores
  are one threshold, so the result never depends on the order of ties).
- EER: at the crossing of the ROC curve, ``fpr[nanargmin(|fnr - fpr|)]`` with ``fnr = 1 - tpr``
  over ``sklearn.metrics.roc_curve`` (DeepfakeBench's definition, the one most papers report).
- ACC: fraction of correct calls with "fake" at score >= threshold (0.5 by default).
Metrics that need both classes are NaN (null in JSON) when a set has only one.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _two_classes(y: np.ndarray) -> bool:
    return len(y) > 0 and y.min() != y.max()


def auc(labels, scores) -> float:
    y, s = np.asarray(labels, int), np.asarray(scores, float)
    return float(roc_auc_score(y, s)) if _two_classes(y) else float("nan")


def average_precision(labels, scores) -> float:
    y, s = np.asarray(labels, int), np.asarray(scores, float)
    return float(average_precision_score(y, s)) if _two_classes(y) else float("nan")


def eer(labels, scores) -> float:
    """Equal error rate at the ROC crossing (DeepfakeBench): fpr where |fnr - fpr| is smallest."""
    y, s = np.asarray(labels, int), np.asarray(scores, float)
    if not _two_classes(y):
        return float("nan")
    fpr, tpr, _ = roc_curve(y, s)
    return float(fpr[np.nanargmin(np.abs((1 - tpr) - fpr))])


def summarize(labels, scores, threshold: float = 0.5) -> dict:
    y, s = np.asarray(labels, int), np.asarray(scores, float)
    return {
        "n": int(len(y)),
        "acc": float(((s >= threshold).astype(int) == y).mean()) if len(y) else float("nan"),
        "auc": auc(y, s),
        "ap": average_precision(y, s),
        "eer": eer(y, s),
    }


def by_video(records) -> tuple[list[str], dict[str, int], dict[str, list[float]]]:
    """Group (video key, label, frame score) records by their true video, keys sorted."""
    frames: dict[str, list[float]] = defaultdict(list)
    labels: dict[str, int] = {}
    for key, label, score in records:
        frames[key].append(score)
        labels[key] = label
    return sorted(frames), labels, frames


def frame_and_video(records, threshold: float = 0.5) -> dict:
    """``records``: (video key, label, frame score) triples -> frame- and video-level metrics.

    Video score = mean of its frame scores (paper); frames are grouped by their true video key.
    """
    keys, labels, frames = by_video(records)
    return {
        "frame": summarize([r[1] for r in records], [r[2] for r in records], threshold),
        "video": summarize([labels[k] for k in keys], [float(np.mean(frames[k])) for k in keys], threshold),
    }
