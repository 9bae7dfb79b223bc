"""The prepare stage: extract face clips once per video into a memory-mappable cache.

Layout of a cache folder:
    cache.json                 the settings the crops were made with (sizes, n, clips, margin)
    <key>/image.npy            (K, S, S, 3) uint8: each clip's first frame at the backbone size
    <key>/frames.npy           (K, n, s, s, 3) uint8: each clip's n frames at the LDA size
    <key>/meta.json            label, split, method, source path, frame indices, boxes

A video's folder is written under a temporary name and renamed when complete, so a run killed
at any moment leaves no half-written entry; the next run skips finished videos and removes
leftovers. Per clip the largest face is kept (the data sets show one subject per video).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import faces as faces_mod
from .config import CROP_MARGIN
from .data import VideoItem
from .errors import ConfigError, DeepscanError
from .video import check_readable, probe, sample_clips
from .workers import DEEP_EVERY, FULL_EVERY


@dataclass(frozen=True)
class PrepareSettings:
    image_size: int = 398
    lda_size: int = 224
    clip_len: int = 3  # n; crops for n frames serve every variant (xception reads the first)
    clips: int = 32  # evenly spaced clips per video, as common FF++ protocols
    margin: float = CROP_MARGIN
    min_face: int = faces_mod.MIN_FACE


def entry_name(key: str) -> str:
    return re.sub(r"[^\w.-]+", "__", key)


def _check_settings(cache: Path, settings: PrepareSettings) -> None:
    path = cache / "cache.json"
    want = asdict(settings)
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            raise ConfigError(f"{cache}: made with other settings ({have}); use another --cache folder")
    else:
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=1))


def is_done(cache: Path, item: VideoItem) -> bool:
    return (cache / entry_name(item.key) / "meta.json").is_file()


def prepare_video(item: VideoItem, cache: Path, detector, settings: PrepareSettings) -> dict:
    """Extract and store one video's face clips; returns its meta record."""
    final = cache / entry_name(item.key)
    meta = {**asdict(item), "clips": 0, "frame_indices": [], "boxes": [], "error": None}
    images, frames = [], []
    try:
        check_readable(item.path)
        info = probe(item.path)
        last_box = None  # where the face was in the previous clip: the detector looks there first
        for clip in sample_clips(info, settings.clips, settings.clip_len):
            hints = [last_box] if last_box else []
            dets = faces_mod.filter_faces(detector(clip.frames[0], hints=hints, follow=hints, min_face=settings.min_face,
                                                   deep=clip.index % DEEP_EVERY == 0,
                                                   full=clip.index % FULL_EVERY == 0), settings.min_face)
            if not dets:
                continue
            det = max(dets, key=lambda d: (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
            last_box = det.box
            (fc,) = faces_mod.face_clips(item.path, clip, [det], [0], settings.image_size, settings.lda_size,
                                         settings.margin)
            images.append(fc.image)
            frames.append(fc.frames)
            meta["frame_indices"].append(list(fc.frame_indices))
            meta["boxes"].append([round(v, 1) for v in fc.box])
    except DeepscanError as exc:
        meta["error"] = str(exc)
    meta["clips"] = len(images)
    # a unique temporary name: several processes (or nodes sharing the folder) may write at once
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    if images:
        np.save(tmp / "image.npy", np.stack(images))
        np.save(tmp / "frames.npy", np.stack(frames))
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)  # atomic: the entry appears complete or not at all
    except OSError:  # another process finished the same video first: its entry stands
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def begin(cache: Path, settings: PrepareSettings) -> None:
    """Check (or record) the cache's settings and remove what a killed run left half-written."""
    _check_settings(cache, settings)
    for leftover in cache.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def prepare(items: list[VideoItem], cache: str | Path, detector, settings: PrepareSettings, advance=None) -> dict:
    """Prepare every item not yet in the cache. Returns counts."""
    cache = Path(cache)
    begin(cache, settings)
    counts = {"done_before": 0, "prepared": 0, "no_face": 0, "errors": 0}
    for item in items:
        if is_done(cache, item):
            counts["done_before"] += 1
        else:
            meta = prepare_video(item, cache, detector, settings)
            counts["prepared"] += 1
            counts["errors"] += meta["error"] is not None
            counts["no_face"] += meta["error"] is None and meta["clips"] == 0
        if advance:
            advance()
    return counts


@dataclass(frozen=True)
class CachedVideo:
    key: str
    label: int
    split: str
    method: str
    clips: int
    folder: str


def load_cache(cache: str | Path, items: list[VideoItem]) -> list[CachedVideo]:
    """The prepared videos among ``items`` that have at least one face clip."""
    cache = Path(cache)
    out = []
    for item in items:
        meta_path = cache / entry_name(item.key) / "meta.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        if meta["clips"]:
            out.append(CachedVideo(item.key, item.label, item.split, item.method, meta["clips"], str(meta_path.parent)))
    return out


def open_arrays(video: CachedVideo) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(video.folder)
    return np.load(folder / "image.npy", mmap_mode="r"), np.load(folder / "frames.npy", mmap_mode="r")
