"""The human-readable scan table (stdout)."""

from __future__ import annotations

from rich.table import Table

_STYLE = {"fake": "bold red", "real": "green", "no-face": "yellow", "error": "magenta"}


def results_table(results, info, detector: str, threshold: float) -> Table:
    title = f"deepscan: {info.variant} model, {detector} faces, threshold {threshold}"
    if info.untrained:
        title += "  [UNTRAINED CHECKPOINT: scores are meaningless]"
    table = Table(title=title, title_justify="left")
    for col, just in (("video", "left"), ("verdict", "left"), ("score", "right"), ("faces", "right"),
                      ("frames", "right"), ("seconds", "right"), ("note", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for r in results:
        score = "" if r.score is None else f"{r.score:.3f}"
        note = r.error or "; ".join(r.warnings) or (r.heatmaps and f"heatmaps: {r.heatmaps}") or ""
        frames = sum(len(f) for f in r.tracks.values())
        table.add_row(r.path, f"[{_STYLE[r.verdict]}]{r.verdict}[/]", score, str(len(r.tracks)),
                      str(frames), f"{r.timings.get('total_s', 0):.1f}", note)
    return table
