"""Detection metrics in plain numpy: ACC, AUC, AP, EER, at frame and video level."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if one class only."""
    y, s = np.asarray(labels, int), np.asarray(scores, float)
    pos, neg = (y == 1).sum(), (y == 0).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), float)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(labels, scores) -> float:
    y, s = np.asarray(labels, int), np.asarray(scores, float)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    hits = y[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def eer(labels, scores) -> float:
    """Equal error rate: where the false-positive and false-negative rates meet."""
    y, s = np.asarray(labels, int), np.asarray(scores, float)
    if y.min() == y.max():
        return float("nan")
    best = 1.0
    for t in np.unique(s):
        fpr = ((s >= t) & (y == 0)).sum() / (y == 0).sum()
        fnr = ((s < t) & (y == 1)).sum() / (y == 1).sum()
        best = min(best, max(fpr, fnr))
    return float(best)


def summarize(labels, scores, threshold: float = 0.5) -> dict:
    y, s = np.asarray(labels, int), np.asarray(scores, float)
    return {
        "n": int(len(y)),
        "acc": float(((s >= threshold).astype(int) == y).mean()) if len(y) else float("nan"),
        "auc": auc(y, s),
        "ap": average_precision(y, s),
        "eer": eer(y, s),
    }


def frame_and_video(records, threshold: float = 0.5) -> dict:
    """``records``: (video key, label, frame score) triples -> frame- and video-level metrics.

    Video score = mean of its frame scores (paper); frames are grouped by their true video key.
    """
    frame_y = [r[1] for r in records]
    frame_s = [r[2] for r in records]
    by_video = defaultdict(list)
    labels = {}
    for key, label, score in records:
        by_video[key].append(score)
        labels[key] = label
    keys = sorted(by_video)
    return {
        "frame": summarize(frame_y, frame_s, threshold),
        "video": summarize([labels[k] for k in keys], [float(np.mean(by_video[k])) for k in keys], threshold),
    }
