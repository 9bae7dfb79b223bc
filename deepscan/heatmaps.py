"""Attention heatmaps: the most suspicious face crops with their 14x14 patch maps overlaid.

As in the paper's Figs. 2, 10 and 11, each map is drawn per patch (nearest expansion, so the
16x16 patches stay visible). A component's m maps are averaged for the overlay and also shown
one by one in a strip below. Colours are normalised per image (min-max), so compare shapes,
not absolute values, across images. Headless: Pillow only.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 224


def _colormap(x: np.ndarray) -> np.ndarray:
    """A blue-cyan-yellow-red ramp for values in [0, 1] -> (..., 3) uint8."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], float)
    pos = np.clip(x, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


def _normalise(m: np.ndarray) -> np.ndarray:
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.full_like(m, 0.5)


def overlay(crop: np.ndarray, amap: np.ndarray, alpha: float = 0.5, size: int = TILE) -> np.ndarray:
    """A face crop with one 2-D attention map blended over it, patch by patch."""
    face = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), float)
    heat = Image.fromarray(_colormap(_normalise(amap))).resize((size, size), Image.NEAREST)
    return (face * (1 - alpha) + np.asarray(heat, float) * alpha).astype(np.uint8)


def safe_folder_name(path: str) -> str:
    """A folder name from a video path: readable, no separators or dots to escape, and unique
    per absolute path (8 hex of its SHA-1), so a rerun writes into the same folder."""
    stem = Path(path).name or "video"
    clean = re.sub(r"[^\w.-]+", "_", stem, flags=re.UNICODE).strip("._") or "video"
    clean = clean.encode("utf-8", "replace").decode("utf-8")[:80]  # no lone surrogates on disk
    tag = hashlib.sha1(str(Path(path).absolute()).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{clean}-{tag}"


def _label(img: Image.Image, text: str) -> Image.Image:
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.rectangle([0, 0, img.width, 14], fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 255), font=font)
    return img


def panel(frame, components: list[str]) -> Image.Image:
    """One face clip: [face | overlay per component] on top, each single map below."""
    tiles = [_label(Image.fromarray(np.asarray(Image.fromarray(frame.crop).resize((TILE, TILE)))),
                    f"frame {frame.index} t={frame.time_s:.2f}s P(fake)={frame.score:.3f}")]
    strips = []
    for comp in components:
        maps = frame.maps[comp]
        tiles.append(_label(Image.fromarray(overlay(frame.crop, maps.mean(0))), f"{comp} (mean of {len(maps)})"))
        small = TILE // max(len(maps), 1)
        strips.extend(Image.fromarray(overlay(frame.crop, m, alpha=0.7, size=small)) for m in maps)
    width = TILE * len(tiles)
    strip_h = TILE // 4 if strips else 0
    img = Image.new("RGB", (width, TILE + strip_h), (0, 0, 0))
    for i, tile in enumerate(tiles):
        img.paste(tile, (i * TILE, 0))
    x = TILE
    for s in strips:
        img.paste(s.resize((strip_h, strip_h)), (x, TILE))
        x += strip_h
    return img


def write_heatmaps(path: str, verdict: str, score: float, frames: list, out_dir: str | Path,
                   timeline: tuple[dict, float] | None = None) -> str | None:
    """Write PNGs of ``frames`` (the most suspicious face clips, with crops and maps, most
    suspicious first), a contact sheet and, given ``timeline`` = ({track id: [(time s, score)]},
    threshold), ``timeline.png`` into the video's folder under ``out_dir``; return the
    folder. PNGs left there by an earlier run are removed first. Raises OSError (e.g. a full
    disk) or ValueError (the folder would lie outside ``out_dir``, through a link)."""
    frames = [f for f in frames if f.crop is not None and f.maps]
    if not frames:
        return None
    components = sorted(frames[0].maps)
    root = Path(out_dir).resolve()
    folder = root / safe_folder_name(path)
    if folder.is_symlink() or root not in folder.resolve().parents:  # never write outside out_dir
        raise ValueError(f"{folder.name} in {root} is a link leading elsewhere; refusing to write through it")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    try:
        _write_pngs(folder, path, verdict, score, frames, components, timeline)
    except BaseException:
        # a half-written set (a full disk) is worse than none: the record says they were not written
        for written in folder.glob("*.png"):
            written.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()
        raise
    return str(folder)


def _write_pngs(folder: Path, path: str, verdict: str, score: float, frames: list, components: list,
                timeline: tuple[dict, float] | None) -> None:
    panels = []
    for rank, f in enumerate(frames, 1):
        img = panel(f, components)
        img.save(folder / f"rank{rank:02d}_frame{f.index:06d}.png")
        panels.append(img)
    head = Image.new("RGB", (panels[0].width, 18), (0, 0, 0))
    name = Path(path).name.encode("utf-8", "replace").decode("utf-8")
    _label(head, f"{name}: verdict {verdict}, score {score:.3f}")
    sheet = Image.new("RGB", (panels[0].width, 18 + sum(p.height for p in panels)), (0, 0, 0))
    sheet.paste(head, (0, 0))
    y = 18
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height
    sheet.save(folder / "contact_sheet.png")
    if timeline is not None:
        from .plots import timeline_png

        tracks, threshold = timeline
        timeline_png(folder / "timeline.png", tracks, threshold, f"{name}: {verdict}, score {score:.3f}")
