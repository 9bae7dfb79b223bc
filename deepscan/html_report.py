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
import html
import io
import os
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


def _t(value) -> str:
    """Any value as HTML text: control characters shown as escapes (``output.shown``), then
    markup characters escaped."""
    return html.escape(shown(str(value)), quote=True)


def compact(record: dict) -> dict:
    """What the page needs of a scan record (a scan keeps this much per input, not the record)."""
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    video = record.get("video") if isinstance(record.get("video"), dict) else {}
    tracks = []
    for t in record.get("tracks") or []:
        frames = [(f.get("index"), f.get("time_s"), f.get("score"), f.get("box")) for f in t.get("frames") or []
                  if isinstance(f, dict)]
        tracks.append({"id": t.get("id"), "score": t.get("score"), "frames": frames})
    return {"path": record.get("path"), "verdict": record.get("verdict"), "score": record.get("score"),
            "error": record.get("error"), "warnings": list(record.get("warnings") or []),
            "threshold": record.get("threshold"), "detector": record.get("detector"), "model": model,
            "duration_s": video.get("duration_s"), "tracks": tracks, "heatmaps": record.get("heatmaps")}


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
                   f'<title>face {_t(t["id"])}: score {t["score"]}</title></polyline>')
        if len(pts) == 1:
            out.append(f'<circle cx="{x(pts[0][0]):.1f}" cy="{y(pts[0][1]):.1f}" r="2.5" fill="{colour}"/>')
    out.append("</svg>")
    return "".join(out)


def thumbnails(item: dict, count: int = THUMBS) -> list[tuple[int, float, str]]:
    """The ``count`` most suspicious face crops of a video, cut from the video at the recorded
    boxes: (frame index, score, JPEG data URI). Raises OSError/DeepscanError when the video
    cannot be read."""
    import numpy as np
    from PIL import Image

    from .faces import crop_box, crop_square
    from .video import probe, read_clips

    frames = sorted(((f[2], f[0], f[3]) for t in item["tracks"] for f in t["frames"]
                     if None not in (f[0], f[2], f[3])), key=lambda v: -v[0])[:count]
    if not frames:
        return []
    info = probe(item["path"])
    scale = info.width / max(1, info.source_width)  # boxes are in displayed pixels of the source
    wanted = sorted({idx for _, idx, _ in frames})
    decoded = {c.frame_indices[0]: c.frames[0] for c in read_clips(info, wanted, 1)}
    out = []
    for score, idx, box in frames:
        if idx not in decoded:
            continue
        crop = crop_square(decoded[idx], crop_box([v * scale for v in box]), THUMB_PX)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, "JPEG", quality=80)
        out.append((idx, score, "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()))
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
            f'<p class="meta">model {_t(model.get("variant", "?"))}, checkpoint {_t(model.get("checkpoint", "?"))} '
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
        score_text = f"{score:.3f}" if isinstance(score, (int, float)) else "-"
        if verdict == "error":
            detail = _t(i.get("error") or "error")
        elif verdict == "no-face":
            detail = "no face found"
        else:
            detail = f"{len(i['tracks'])} face(s)"
        extra, shown_now = [], ""
        if i["tracks"]:
            extra.append(timeline_svg(i, float(i.get("threshold") or threshold)))
            shots = thumbs.get(i["path"])
            if shots:  # in the row itself: the most suspicious faces at a glance
                shown_now = '<div class="thumbs">' + "".join(
                    f'<img alt="frame {idx}, score {s:.3f}" title="frame {idx}, score {s:.3f}" src="{uri}">'
                    for idx, s, uri in shots) + "</div>"
            if i.get("heatmaps") and Path(str(i["heatmaps"])).is_dir():
                links = []
                for png in sorted(Path(str(i["heatmaps"])).glob("*.png")):
                    href = os.path.relpath(png.resolve(), base)
                    links.append(f'<a href="{_t(Path(href).as_posix())}">{_t(png.name)}</a>')
                extra.append('<div class="note">heatmaps: ' + " ".join(links) + "</div>")
        for w in i.get("warnings") or []:
            extra.append(f'<div class="note">warning: {_t(w)}</div>')
        opened = " open" if len(items) <= OPEN_UP_TO else ""
        more = f"<details{opened}><summary>timeline</summary>{''.join(extra)}</details>" if extra else ""
        rows.append(f'<tbody class="item" data-verdict="{_t(verdict)}" data-score="{"" if score is None else score}" '
                    f'data-name="{_t(i.get("path"))}"><tr><td class="name">{_t(i.get("path"))}</td>'
                    f'<td class="v-{_t(verdict)}">{_t(verdict)}</td><td class="num">{score_text}</td>'
                    f"<td>{detail}{shown_now}{more}</td></tr></tbody>")
    table = ('<table id="results"><thead><tr><th data-key="name">input</th><th data-key="verdict">verdict</th>'
             f'<th data-key="score">score</th><th>details</th></tr></thead>{"".join(rows)}</table>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data: file:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<title>{_t(title)}</title><style>{_CSS}</style></head><body>{''.join(head)}{table}"
            f"<script>{_SCRIPT}</script></body></html>\n")


def write_report(items: list[dict], out: str | os.PathLike, *, thumbs_for: int = 200, notes: list[str] | None = None,
                 title: str = "deepscan report") -> Path:
    """Write the page for ``items`` to ``out`` (whole or not at all), with thumbnails cut from the
    ``thumbs_for`` highest-scoring face videos that can still be read. Returns the path."""
    from .errors import DeepscanError

    out = Path(out)
    notes = list(notes or [])
    face = sorted((i for i in items if i["tracks"]), key=lambda i: -(i["score"] or 0.0))
    thumbs, unreadable = {}, 0
    for i in face[:thumbs_for]:
        try:
            thumbs[i["path"]] = thumbnails(i)
        except (OSError, DeepscanError):
            unreadable += 1
    if unreadable:
        notes.append(f"{unreadable} video(s) could not be read again (moved, deleted, or on another machine): "
                     "their thumbnails are left out")
    if len(face) > thumbs_for:
        notes.append(f"thumbnails for the {thumbs_for} highest-scoring face videos of {len(face)}")
    from .output import write_atomically

    write_atomically(out, page(items, out, thumbs=thumbs, notes=notes, title=title))
    return out


def read_records(files: list[Path], say=None) -> list[dict]:
    """The ``compact`` records of scan output files (``--output``), the last record of each path
    winning (as for every reader of those files), in the order paths first appear. Lines that are
    not deepscan records are counted and skipped."""
    import json

    from .errors import ConfigError

    items: dict = {}
    for f in files:
        skipped = 0
        try:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        skipped += bool(line.strip())
                        continue
                    if not isinstance(rec, dict) or not str(rec.get("schema", "")).startswith("deepscan.scan/") \
                            or not isinstance(rec.get("path"), str):
                        skipped += 1
                        continue
                    items[rec["path"]] = compact(rec)
        except UnicodeDecodeError:
            raise ConfigError(f"{f}: not UTF-8 text; give the JSON Lines files `deepscan scan --output` wrote") from None
        except OSError as exc:
            raise ConfigError(f"{f}: cannot read it ({exc.strerror}); give the JSON Lines files `deepscan scan "
                              "--output` wrote") from None
        if skipped and say:
            say(f"warning: {shown(str(f))}: {skipped} line(s) that are not deepscan records skipped")
    return list(items.values())
