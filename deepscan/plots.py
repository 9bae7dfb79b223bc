"""Evaluation plots (``deepscan eval --plots DIR``): ROC curves and score histograms, as PNG.

For frame and video level each: ``roc_<level>.png`` with one ROC curve for all videos and one
per FF++ manipulation method (its fakes against all reals, as the metrics), AUC in the legend;
``hist_<level>.png`` with the score distributions of real and fake. matplotlib's Agg backend:
no display needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _curves(scores: list[dict], level: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, labels, scores) for the overall set and each method present."""

    def flat(rows):
        if level == "video":
            return np.array([r["label"] for r in rows]), np.array([r["score"] for r in rows])
        labels = [r["label"] for r in rows for _ in r["frame_scores"]]
        return np.array(labels), np.array([s for r in rows for s in r["frame_scores"]])

    out = [("all", *flat(scores))]
    methods = sorted({r["method"] for r in scores if r["method"] and r["label"] == 1})
    if len(methods) > 1:
        for m in methods:
            out.append((m, *flat([r for r in scores if r["label"] == 0 or r["method"] == m])))
    return out


def write_plots(scores: list[dict], out_dir: str | Path, title: str) -> list[Path]:
    """Write the PNGs for ``scores`` (the records of ``train.video_scores``); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    out_dir = Path(out_dir)
    written = []
    for level in ("frame", "video"):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for name, y, s in _curves(scores, level):
            if len(y) == 0 or y.min() == y.max():
                continue  # one class only: no curve
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, lw=2 if name == "all" else 1.2, label=f"{name} (AUC {roc_auc_score(y, s):.3f}, n={len(y)})")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
               title=f"ROC, {level} level\n{title}")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"roc_{level}.png", dpi=110))

        _, y, s = _curves(scores, level)[0]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        bins = np.linspace(0, 1, 41)
        for label, name, colour in ((0, "real", "tab:green"), (1, "fake", "tab:red")):
            if (y == label).any():
                ax.hist(s[y == label], bins=bins, alpha=0.6, color=colour, label=f"{name} (n={(y == label).sum()})")
        ax.set(xlabel="P(fake)", ylabel=f"{level}s", title=f"Scores, {level} level\n{title}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"hist_{level}.png", dpi=110))
    return written


def timeline_png(path: str | Path, tracks: dict, threshold: float, title: str) -> Path:
    """Score over time, one line per face track, the threshold dashed (``timeline.png`` beside a
    video's heatmaps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 2.4), dpi=100)
    for tid, points in sorted(tracks.items()):
        pts = sorted(points)
        ax.plot([t for t, _ in pts], [p for _, p in pts], marker="o", markersize=2.5, linewidth=1.2, label=f"face {tid}")
    ax.axhline(threshold, color="#888", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("P(fake)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, Path(path))


def _save(fig, path: Path, **kwargs) -> Path:
    """Write ``fig`` to ``path`` and close it; a write that fails (a full disk) leaves no partial
    PNG and raises OutputError naming the file."""
    import matplotlib.pyplot as plt

    from .errors import OutputError, io_reason

    try:
        fig.savefig(path, **kwargs)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise OutputError(f"{path}: writing failed ({io_reason(exc, path.parent)}); choose another place") from None
    finally:
        plt.close(fig)
    return path
