"""The human-readable scan table (stdout)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from .output import shown

_STYLE = {"fake": "bold red", "real": "green", "no-face": "yellow", "error": "magenta"}


def _tail(text: str, limit: int) -> str:
    """A path cut from the left, keeping its file name: '…/videos/clip.mp4'."""
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def results_table(rows, info, detector: str, threshold: float, aggregation: str = "mean",
                  sha256: str | None = None, width: int | None = None) -> Table:
    """One line per video from the scan's small rows, at any terminal width (``width``: the
    console's; paths are cut from the left, notes with an ellipsis: the full text is in --json
    and the report). User strings (paths, notes) go in as ``Text``, never as markup: "clip
    [1080p].mp4" is a file name, not a style. The title names the model, its variant, the
    checkpoint's sha256 and its licence."""
    sha = f", sha256 {sha256[:12]}" if sha256 else ""
    lic = f", licence: {info.license}" if info.license else ""
    title = f"deepscan: {info.name} ({info.variant}{sha}{lic}), {detector} faces, threshold {threshold}"
    if aggregation != "mean":
        title += f", track score = {aggregation} of frames (paper: mean)"
    if info.untrained:
        title += "  [UNTRAINED CHECKPOINT: scores are meaningless]"
    table = Table(title=Text(shown(title)), title_justify="left")
    # one line per video: the path (cut from the left, keeping the file name) and the note (cut
    # with an ellipsis) share what the fixed columns and the borders (52 characters) leave
    room = max(24, (width or 1000) - 52)
    paths = [shown(r.path) for r in rows]
    path_w = min(max([5, *map(len, paths)]), max(12, room - 10))  # the name first, what is left to the note
    note_w = max(8, room - path_w)
    for col, just in (("video", "left"), ("verdict", "left"), ("score", "right"), ("faces", "right"),
                      ("frames", "right"), ("seconds", "right"), ("note", "left")):
        table.add_column(col, justify=just, no_wrap=True, overflow="ellipsis")
    for r, path in zip(rows, paths):
        score = "" if r.score is None else f"{r.score:.3f}"
        note = shown(r.note)
        note = note if len(note) <= note_w else note[:note_w - 1] + "…"
        table.add_row(Text(_tail(path, path_w)), Text(r.verdict, style=_STYLE[r.verdict]), score,
                      str(r.faces), str(r.frames), f"{r.seconds:.1f}", Text(note))
    return table


# The paper's numbers (percent) to print beside ours: FF++ per method, frame level (Table III,
# trained and tested per method) and video level (Table IV, c40); overall FF++ (Table I) and
# Celeb-DF (Table II).
PAPER_METHODS = {
    "Deepfakes": {"frame": (99.47, 99.79), "video": (99.29, 99.64)},
    "Face2Face": {"frame": (99.98, 100.00), "video": (99.64, 99.75)},
    "FaceSwap": {"frame": (98.27, 99.46), "video": (98.58, 99.81)},
    "NeuralTextures": {"frame": (93.25, 98.61), "video": (94.29, 96.31)},
}
PAPER_OVERALL = {("ffpp", "c23"): (99.51, 99.88), ("ffpp", "c40"): (95.81, 98.49), ("celebdf", None): (99.13, 99.87)}


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.2f}"


def eval_table(result: dict) -> Table:
    title = (f"{result.get('model') or result['variant']} ({result['variant']}, sha256 {str(result.get('sha256'))[:12]}"
             f"{', licence: ' + result['license'] if result.get('license') else ''}) on {result['layout']} "
             f"{result['split']} ({result['checkpoint']})")
    if result.get("untrained"):
        title += "  [UNTRAINED CHECKPOINT]"
    table = Table(title=Text(shown(title)), title_justify="left")
    for col in ("subset", "level", "n", "ACC", "AUC", "AP", "EER", "paper ACC", "paper AUC"):
        table.add_column(col, justify="left" if col in ("subset", "level") else "right")
    key = (result["layout"], result.get("compression") if result["layout"] == "ffpp" else None)
    rows = [("all", result["overall"], {"frame": PAPER_OVERALL.get(key), "video": None})]
    for m, met in result.get("methods", {}).items():
        rows.append((m, met, PAPER_METHODS.get(m, {})))
    for name, met, paper in rows:
        for level in ("frame", "video"):
            s = met[level]
            p = paper.get(level) or (None, None)
            table.add_row(Text(shown(name)), level, str(s["n"]), _pct(s["acc"]), _pct(s["auc"]), _pct(s["ap"]), _pct(s["eer"]),
                          "-" if p[0] is None else f"{p[0]:.2f}", "-" if p[1] is None else f"{p[1]:.2f}")
    return table
