"""One self-contained HTML page of a scan's results (``scan --report``, ``deepscan report``).

Inline CSS, inline SVG timelines, thumbnails as data URIs and a little inline script to sort and
filter: nothing is fetched from anywhere, so the page opens offline and can be mailed. Every
string that comes from a video or a record (names, errors, warnings) is escaped text, never markup.

Why by hand rather than a template engine: the page is one table and a few SVG polylines; Jinja2
or similar would be a new dependency for ~100 lines, and escaping is done here in one place
(``_t``) for every value.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import os
import re
import stat
from collections import Counter
from pathlib import Path

from .output import shown

VERDICTS = ("fake", "real", "no-face", "error")
THUMBS = 3  # most suspicious face crops shown per video
THUMB_PX = 72
OPEN_UP_TO = 20  # pages of this many inputs or fewer show every timeline opened
_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
.meta{color:#444;margin:.2em 0}
.untrained{background:#fff3cd;border:1px solid #e0b000;padding:.5em .8em;margin:.6em 0;font-weight:600}
.counts span{display:inline-block;margin-right:1.2em}
table{border-collapse:collapse;width:100%;margin-top:1em}
th,td{padding:.35em .5em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{cursor:pointer;background:#f4f4f4;user-select:none}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.v-fake{color:#b00020;font-weight:600}.v-real{color:#1b5e20}.v-no-face{color:#666}.v-error{color:#8a4b00}
.name{word-break:break-all}
details summary{cursor:pointer;color:#0b57d0}
.thumbs img{width:72px;height:72px;margin:2px;border:1px solid #ccc}
.note{color:#666;font-size:.9em}
svg.timeline{background:#fafafa;border:1px solid #ddd}
"""

_SCRIPT = """
(function(){
var body=document.getElementById('results');
document.querySelectorAll('th[data-key]').forEach(function(th){th.addEventListener('click',function(){
 var key=th.dataset.key, dir=th.dataset.dir==='asc'?'desc':'asc'; th.dataset.dir=dir;
 var items=Array.prototype.slice.call(body.querySelectorAll('tbody.item'));
 items.sort(function(a,b){var x=a.dataset[key],y=b.dataset[key];
  if(key==='score'){x=x===''?-1:parseFloat(x);y=y===''?-1:parseFloat(y);}
  return (x<y?-1:x>y?1:0)*(dir==='asc'?1:-1);});
 items.forEach(function(i){body.appendChild(i);});});});
var sel=document.getElementById('filter');
sel.addEventListener('change',function(){var v=sel.value;
 body.querySelectorAll('tbody.item').forEach(function(i){i.hidden=!(v===''||i.dataset.verdict===v);});});
})();
"""


# The page's one script runs by its hash; no other script, inline handler (onclick=, onerror=) or
# javascript: URL can run, whatever a record holds. Styles inline, images from data: and file:.
CSP = ("default-src 'none'; img-src data: file:; style-src 'unsafe-inline'; "
       f"script-src 'sha256-{base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()}'; "
       "base-uri 'none'; form-action 'none'")


def _t(value) -> str:
    """Any value as HTML text: control characters shown as escapes (``output.shown``), then
    markup characters escaped."""
    return html.escape(shown(str(value)), quote=True)


class BadRecord(ValueError):
    """A record line that cannot be shown as it is (a field of the wrong type or out of range)."""


MAX_BOX = 100_000.0  # px: no video is larger; a box beyond it is crafted, never cut into a thumbnail
MAX_TRACKS, MAX_FRAMES, MAX_TEXT = 1_000, 10_000, 10_000


def _number(value, name: str, lo: float | None = None, hi: float | None = None, *, none: bool = True):
    """A finite number (not a bool, a string or NaN) in [lo, hi], or None where allowed."""
    if value is None and none:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        raise BadRecord(f"field {name!r} is not a number{'' if lo is None else f' in [{lo:g}, {hi:g}]'}: {shown(repr(value))[:60]}")
    return value


def _text(value, name: str, *, none: bool = True) -> str | None:
    if value is None and none:
        return None
    if not isinstance(value, str):
        raise BadRecord(f"field {name!r} is not text")
    return value[:MAX_TEXT]


def _box(value, name: str):
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 4:
        raise BadRecord(f"field {name!r} is not a box [x1, y1, x2, y2]")
    box = [_number(v, name, -MAX_BOX, MAX_BOX, none=False) for v in value]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise BadRecord(f"field {name!r} is an empty box")
    return box


def compact(record: dict) -> dict:
    """What the page needs of a scan record (a scan keeps this much per input, not the record),
    every field checked for its type and range: a record file may come from anyone, so a value
    the page cannot show as it is raises BadRecord (the line is skipped and counted)."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    path = _text(record.get("path"), "path", none=False)
    verdict = record.get("verdict")
    if verdict not in VERDICTS:
        raise BadRecord(f"field 'verdict' is not one of {', '.join(VERDICTS)}")
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    model = {k: v for k, v in model.items() if isinstance(k, str) and (v is None or type(v) in (str, bool))}
    video = record.get("video") if isinstance(record.get("video"), dict) else {}
    raw_tracks = record.get("tracks") or []
    if not isinstance(raw_tracks, list) or len(raw_tracks) > MAX_TRACKS:
        raise BadRecord("field 'tracks' is not a list of tracks")
    tracks = []
    for t in raw_tracks:
        if not isinstance(t, dict) or not isinstance(t.get("frames") or [], list):
            raise BadRecord("field 'tracks' holds something that is not a track")
        if type(t.get("id")) is not int:
            raise BadRecord("a track's 'id' is not an integer")
        frames = []
        for f in (t.get("frames") or [])[:MAX_FRAMES]:
            if not isinstance(f, dict):
                raise BadRecord("a track's 'frames' holds something that is not a frame")
            index = f.get("index")
            if index is not None and (type(index) is not int or index < 0):
                raise BadRecord("a frame's 'index' is not a frame number")
            frames.append((index, _number(f.get("time_s"), "time_s", 0, 1e7), _number(f.get("score"), "score", 0, 1),
                           _box(f.get("box"), "box")))
        tracks.append({"id": t["id"], "score": _number(t.get("score"), "track score", 0, 1), "frames": frames})
    warnings = record.get("warnings") or []
    if not isinstance(warnings, list):
        raise BadRecord("field 'warnings' is not a list")
    file = record.get("file") if isinstance(record.get("file"), dict) else None
    if file is not None:
        file = {"size": _number(file.get("size"), "file.size", 0), "mtime_ns": _number(file.get("mtime_ns"), "file.mtime_ns")}
    sha = record.get("sha256")
    return {"path": path, "key": os.path.normpath(path) if path else path, "verdict": verdict,
            "score": _number(record.get("score"), "score", 0, 1), "error": _text(record.get("error"), "error"),
            "warnings": [_text(w, "warnings", none=False) for w in warnings[:100]],
            "threshold": _number(record.get("threshold"), "threshold", 0, 1),
            "detector": _text(record.get("detector"), "detector"), "model": model,
            "duration_s": _number(video.get("duration_s"), "video.duration_s", 0, 1e7), "tracks": tracks,
            "heatmaps": _text(record.get("heatmaps"), "heatmaps"), "file": file,
            "sha256": sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None}


def _score(value) -> str:
    """A score as the page shows it: from a number only (compact checked it), else '-'."""
    return f"{value:.3f}" if type(value) in (int, float) and math.isfinite(value) else "-"


def timeline_svg(item: dict, threshold: float, width: int = 520, height: int = 130) -> str:
    """Score over time, one line per track, the threshold dashed."""
    left, right, top, bottom = 34, 8, 8, 22
    w, h = width - left - right, height - top - bottom
    times = [f[1] for t in item["tracks"] for f in t["frames"] if f[1] is not None]
    end = max([item.get("duration_s") or 0.0, *times, 1e-6])

    def x(s):
        return left + w * (s or 0.0) / end

    def y(p):
        return top + h * (1 - (p or 0.0))

    out = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="score over time">',
           f'<line x1="{left}" y1="{y(threshold):.1f}" x2="{left + w}" y2="{y(threshold):.1f}" stroke="#999" '
           f'stroke-dasharray="4 3"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#555"/>',
           f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#555"/>',
           f'<text x="2" y="{top + 9}" font-size="10">1.0</text><text x="2" y="{top + h}" font-size="10">0.0</text>',
           f'<text x="{left - 30}" y="{y(threshold) + 3:.1f}" font-size="9" fill="#777">{threshold:g}</text>',
           f'<text x="{left}" y="{height - 6}" font-size="10">0 s</text>',
           f'<text x="{left + w - 40}" y="{height - 6}" font-size="10">{end:.1f} s</text>']
    for k, t in enumerate(item["tracks"]):
        colour = _COLOURS[k % len(_COLOURS)]
        pts = sorted((f[1], f[2]) for f in t["frames"] if f[1] is not None and f[2] is not None)
        if not pts:
            continue
        line = " ".join(f"{x(s):.0f},{y(p):.0f}" for s, p in pts)  # whole pixels: a third smaller at 10,000 inputs
        out.append(f'<polyline class="track" fill="none" stroke="{colour}" stroke-width="1.5" points="{line}">'
                   f'<title>face {int(t["id"])}: score {_score(t["score"])}</title></polyline>')
        if len(pts) == 1:
            out.append(f'<circle cx="{x(pts[0][0]):.1f}" cy="{y(pts[0][1]):.1f}" r="2.5" fill="{colour}"/>')
    out.append("</svg>")
    return "".join(out)


class FileChanged(Exception):
    """The file at a record's path is not the one that was scanned."""


def _same_file(item: dict) -> None:
    """The record's video must still be a regular file of the recorded size and mtime (and, where
    the record holds one, sha256): thumbnails of another file would be false evidence. Raises
    OSError (gone, not a regular file) or FileChanged."""
    st = os.stat(item["path"])
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block ffmpeg, a device never end
        raise OSError(f"{item['path']}: not a regular file")
    f = item.get("file")
    if f and (f.get("size") not in (None, st.st_size) or f.get("mtime_ns") not in (None, st.st_mtime_ns)):
        raise FileChanged(item["path"])
    if item.get("sha256"):
        from .hashing import sha256_file

        if sha256_file(item["path"]) != item["sha256"]:
            raise FileChanged(item["path"])


def thumbnails(item: dict, count: int = THUMBS) -> list[tuple[int, float, str]]:
    """The ``count`` most suspicious face crops of a video, cut from the video at the recorded
    boxes: (frame index, score, JPEG data URI). Raises OSError/DeepscanError when the video
    cannot be read, FileChanged when it is not the file that was scanned."""
    import numpy as np
    from PIL import Image

    from .faces import crop_box, crop_square
    from .video import probe, read_clips

    frames = sorted(((f[2], f[0], f[3]) for t in item["tracks"] for f in t["frames"]
                     if None not in (f[0], f[2], f[3])), key=lambda v: -v[0])[:count]
    if not frames:
        return []
    _same_file(item)
    info = probe(item["path"])
    scale = info.width / max(1, info.source_width)  # boxes are in displayed pixels of the source
    largest = 4 * max(info.width, info.height)  # a crop no larger than this: a crafted box never allocates more
    wanted = sorted({idx for _, idx, _ in frames})
    decoded = {c.frame_indices[0]: c.frames[0] for c in read_clips(info, wanted, 1)}
    out = []
    for score, idx, box in frames:
        square = crop_box([v * scale for v in box])
        if idx not in decoded or square[2] - square[0] > largest or square[2] <= 0 or square[3] <= 0 \
                or square[0] >= info.width or square[1] >= info.height:
            continue
        crop = crop_square(decoded[idx], square, THUMB_PX)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, "JPEG", quality=80)
        out.append((idx, score, "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()))
    return out


HEATMAP_FILE = re.compile(r"(rank\d{2}_frame\d{6}|contact_sheet|timeline)\.png")


def heatmap_links(item: dict, base: Path) -> list[tuple[str, str]]:
    """(href, name) of the heatmaps the scan wrote for this record: its ``heatmaps`` folder must be
    one the scan names for this video (``heatmaps.safe_folder_name``: the file's name, a dash, 8
    hex), a real folder (not a link), and only files with the names the scan gives are linked.
    A record naming any other folder links nothing (a page must not list a machine's folders)."""
    from .heatmaps import safe_folder_name

    folder = item.get("heatmaps")
    if not folder or not item.get("path"):
        return []
    folder = Path(folder)
    stem = safe_folder_name(item["path"]).rsplit("-", 1)[0]
    if not re.fullmatch(re.escape(stem) + r"-[0-9a-f]{8}", folder.name) or folder.is_symlink() or not folder.is_dir():
        return []
    out = []
    for png in sorted(folder.iterdir()):
        if HEATMAP_FILE.fullmatch(png.name) and png.is_file() and not png.is_symlink():
            out.append((Path(os.path.relpath(png.resolve(), base)).as_posix(), png.name))
    return out


def page(items: list[dict], out_file: Path, *, thumbs: dict | None = None, notes: list[str] | None = None,
         title: str = "deepscan report") -> str:
    """The HTML page for ``items`` (``compact`` records). ``thumbs``: path -> ``thumbnails()``."""
    thumbs = thumbs or {}
    counts = Counter(i["verdict"] for i in items)
    first = next((i for i in items if i.get("model")), {})
    model = first.get("model") or {}
    detectors = sorted({str(i["detector"]) for i in items if i.get("detector")})
    thresholds = sorted({i["threshold"] for i in items if isinstance(i.get("threshold"), (int, float))})
    threshold = thresholds[0] if thresholds else 0.5
    head = [f"<h1>{_t(title)}</h1>",
            f'<p class="meta">model {_t(model.get("name") or "?")} ({_t(model.get("variant", "?"))}'
            f'{", licence: " + _t(model["license"]) if model.get("license") else ""}), '
            f'checkpoint {_t(model.get("checkpoint", "?"))} '
            f'(sha256 {_t(str(model.get("sha256") or "?")[:12])}), backend {_t(model.get("backend", "torch"))}; '
            f'detector {_t(", ".join(detectors) or "?")}; threshold {_t(", ".join(map(str, thresholds)) or "?")}</p>']
    if any((i.get("model") or {}).get("untrained") for i in items):
        head.append('<p class="untrained">UNTRAINED checkpoint: its scores are random and mean nothing.</p>')
    head.append('<p class="counts">' + "".join(f'<span class="v-{v}">{v}: {counts.get(v, 0)}</span>'
                                              for v in VERDICTS) + f"<span>inputs: {len(items)}</span></p>")
    for n in notes or []:
        head.append(f'<p class="note">{_t(n)}</p>')
    options = "".join(f'<option value="{v}">{v}</option>' for v in VERDICTS)
    head.append(f'<label>show <select id="filter"><option value="">all</option>{options}</select></label>')
    rows = []
    base = out_file.resolve().parent
    for i in items:
        verdict = str(i.get("verdict"))
        score = i.get("score")
        score_text = _score(score)
        data_score = f"{score:.6f}" if type(score) in (int, float) and math.isfinite(score) else ""
        if verdict == "error":
            detail = _t(i.get("error") or "error")
        elif verdict == "no-face":
            detail = "no face found"
        else:
            detail = f"{len(i['tracks'])} face(s)"
        extra, shown_now = [], ""
        if i["tracks"]:
            extra.append(timeline_svg(i, float(i.get("threshold") if i.get("threshold") is not None else threshold)))
            shots = thumbs.get(i["path"])
            if shots:  # in the row itself: the most suspicious faces at a glance
                shown_now = '<div class="thumbs">' + "".join(
                    f'<img alt="frame {int(idx)}, score {_score(s)}" title="frame {int(idx)}, score {_score(s)}" '
                    f'src="{_t(uri)}">' for idx, s, uri in shots) + "</div>"
            links = [f'<a href="{_t(href)}">{_t(name)}</a>' for href, name in heatmap_links(i, base)]
            if links:
                extra.append('<div class="note">heatmaps: ' + " ".join(links) + "</div>")
            if i.get("changed"):
                extra.append('<div class="note">file changed since the scan: no thumbnails cut from it</div>')
        for w in i.get("warnings") or []:
            extra.append(f'<div class="note">warning: {_t(w)}</div>')
        opened = " open" if len(items) <= OPEN_UP_TO else ""
        more = f"<details{opened}><summary>timeline</summary>{''.join(extra)}</details>" if extra else ""
        rows.append(f'<tbody class="item" data-verdict="{_t(verdict)}" data-score="{data_score}" '
                    f'data-name="{_t(i.get("path"))}"><tr><td class="name">{_t(i.get("path"))}</td>'
                    f'<td class="v-{_t(verdict)}">{_t(verdict)}</td><td class="num">{score_text}</td>'
                    f"<td>{detail}{shown_now}{more}</td></tr></tbody>")
    table = ('<table id="results"><thead><tr><th data-key="name">input</th><th data-key="verdict">verdict</th>'
             f'<th data-key="score">score</th><th>details</th></tr></thead>{"".join(rows)}</table>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            f"<title>{_t(title)}</title><style>{_CSS}</style></head><body>{''.join(head)}{table}"
            f"<script>{_SCRIPT}</script></body></html>\n")


def write_report(items: list[dict], out: str | os.PathLike, *, thumbs_for: int = 200, notes: list[str] | None = None,
                 title: str = "deepscan report", say=None) -> Path:
    """Write the page for ``items`` to ``out`` (whole or not at all, with the umask's mode: a page
    is meant to be shared), with thumbnails cut from the ``thumbs_for`` highest-scoring face videos
    that can still be read and are still the files scanned. Returns the path."""
    from .errors import DeepscanError

    out = Path(out)
    notes = list(notes or [])
    face = sorted((i for i in items if i["tracks"]), key=lambda i: -(i["score"] or 0.0))
    thumbs, unreadable, changed = {}, 0, 0
    for i in face[:thumbs_for]:
        try:
            thumbs[i["path"]] = thumbnails(i)
        except FileChanged:
            i["changed"] = True
            changed += 1
        except (OSError, DeepscanError, ValueError, MemoryError):
            unreadable += 1
    if unreadable:
        notes.append(f"{unreadable} video(s) could not be read again (moved, deleted, not a regular file, or on "
                     "another machine): their thumbnails are left out")
    if changed:
        notes.append(f"{changed} video(s) changed since the scan (another size, time or sha256): no thumbnails are "
                     "cut from them")
    if len(face) > thumbs_for:
        notes.append(f"thumbnails for the {thumbs_for} highest-scoring face videos of {len(face)}")
    if say:
        for n in notes:
            say(f"report: {shown(n)}")
    from .output import write_atomically

    write_atomically(out, page(items, out, thumbs=thumbs, notes=notes, title=title), shared=True)
    return out


def read_records(files: list[Path], say=None, notes: list[str] | None = None) -> list[dict]:
    """The ``compact`` records of scan output files (``--output``), the last record of each path
    winning (paths normalised as ``--resume`` does: "./a.mp4" is "a.mp4"), in the order paths
    first appear. Lines that are not deepscan records, torn (a cut multi-byte character
    included), nested too deeply or holding fields of the wrong type are counted, skipped, said
    through ``say`` and listed in ``notes`` (for the page)."""
    import json

    from .errors import ConfigError

    items: dict = {}
    for f in files:
        skipped: Counter = Counter()
        try:
            with open(f, "rb") as fh:
                for raw in fh:
                    if not raw.strip():
                        continue
                    try:
                        rec = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        skipped["not UTF-8 (torn?)"] += 1
                        continue
                    except RecursionError:
                        skipped["nested too deeply"] += 1
                        continue
                    except ValueError:
                        skipped["not JSON (torn?)"] += 1
                        continue
                    if not isinstance(rec, dict) or not str(rec.get("schema", "")).startswith("deepscan.scan/"):
                        skipped["not deepscan records"] += 1
                        continue
                    try:
                        item = compact(rec)
                    except BadRecord:
                        skipped["fields of the wrong type or range"] += 1
                        continue
                    except RecursionError:
                        skipped["nested too deeply"] += 1
                        continue
                    items.pop(item["key"], None)  # the last record wins, and takes its place in the order
                    items[item["key"]] = item
        except OSError as exc:
            raise ConfigError(f"{f}: cannot read it ({exc.strerror}); give the JSON Lines files `deepscan scan "
                              "--output` wrote") from None
        if skipped:
            what = ", ".join(f"{n} {why}" for why, n in skipped.items())
            line = f"{shown(str(f))}: {sum(skipped.values())} line(s) skipped ({what})"
            if say:
                say(f"warning: {line}")
            if notes is not None:
                notes.append(line)
    return list(items.values())
