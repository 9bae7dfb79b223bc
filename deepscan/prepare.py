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

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import faces as faces_mod
from .config import CROP_MARGIN
from .data import VideoItem
from .errors import ConfigError, DeepscanError, OutputError, io_reason
from .video import sample_clips
from .scan.workers import clip_faces, open_video


@dataclass(frozen=True)
class PrepareSettings:
    image_size: int = 398
    lda_size: int = 224
    clip_len: int = 3  # n; crops for n frames serve every variant (xception reads the first)
    clips: int = 32  # evenly spaced clips per video, as common FF++ protocols
    margin: float = CROP_MARGIN
    min_face: int = faces_mod.MIN_FACE
    alignment: str = "none"  # the checkpoint's way of cutting faces (eval of the published Xception: aligned)

    def recorded(self) -> dict:
        """What cache.json holds of these settings ("none" alignment left out: caches made before
        alignment existed read the same)."""
        out = {**asdict(self), "layout": CACHE_LAYOUT}
        if out["alignment"] == "none":
            del out["alignment"]
        return out


CACHE_LAYOUT = 2  # 2: entry names end with a hash of the key (1 merged keys that differ in punctuation)


def entry_name(key: str) -> str:
    """A video's cache folder: a readable prefix of its key and a hash of the whole key, so that
    keys that differ only in characters a file name cannot hold ("a b" and "a&b") never share a
    folder, and a key of any length gives a name far below the file system's 255-byte limit."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    readable = re.sub(r"[^\w.-]+", "_", key, flags=re.ASCII).strip("._")[:80]
    return f"{readable}-{digest}" if readable else digest


def _read_settings(cache: Path) -> dict | None:
    path = cache / "cache.json"
    if not path.is_file():
        return None
    try:
        have = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        have = None
    if not isinstance(have, dict):
        raise ConfigError(f"{path}: damaged (not JSON); delete the --cache folder {cache} (it is rebuilt) or "
                          "use another") from None
    return have


def recorded_detector(cache: Path) -> str | None:
    """The face detector a cache was made with (None: a new cache, or one made before deepscan
    recorded it)."""
    have = _read_settings(cache)
    return have.get("detector") if have else None


def _check_settings(cache: Path, settings: PrepareSettings, detector: str | None = None) -> None:
    """A cache holds crops of one kind: its settings, layout and face detector are recorded when
    it is made, and a run with others is refused (a cache from before detectors were recorded
    takes the detector of its next run)."""
    path = cache / "cache.json"
    want = settings.recorded()
    have = _read_settings(cache)
    if have is not None:
        made_with = have.get("detector")
        if detector and made_with and made_with != detector:
            raise ConfigError(f"{cache}: made with the {made_with} face detector, not {detector}; pass "
                              f"--detector {made_with}, or use another --cache folder")
        check_cache(cache, settings)
        if made_with or not detector:
            return
    tmp = path.with_name(f".cache.json.tmp-{os.getpid()}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**want, **({"detector": detector} if detector else {})}, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _unwritable(cache, exc) from None


def _unwritable(cache: Path, exc: OSError) -> OutputError:
    """The cache cannot take more (a full disk, no permission): the run stops; finished entries stay."""
    return OutputError(f"{cache}: cannot write the face-clip cache ({io_reason(exc, cache)}); free some space "
                       "or pass --cache on another disk, then run again: videos prepared so far are kept")


def is_done(cache: Path, item: VideoItem) -> bool:
    """The video has an entry that finished: with face clips, or without a face. One whose
    preparation failed (an unreadable file, a worker that died) is tried again, as `scan --resume`
    tries errors again."""
    try:
        meta = json.loads((cache / entry_name(item.key) / "meta.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("error") is None


def check_cache(cache: Path, settings: PrepareSettings) -> None:
    """A cache's recorded settings must be the run's, whether or not anything is left to prepare
    (a 398 px model must never train on a cache of 62 px crops)."""
    have = _read_settings(cache)
    if have is None:
        return
    want = settings.recorded()
    if {k: v for k, v in have.items() if k != "detector"} != want:
        differ = sorted(k for k in set(want) | set(have) - {"detector"} if have.get(k) != want.get(k))
        shown_ = ", ".join(f"{k} {have.get(k)!r} (this run: {want.get(k)!r})" for k in differ)
        raise ConfigError(f"{cache}: made with other settings: {shown_}; use another --cache folder or the same "
                          "settings")


def prepare_video(item: VideoItem, cache: Path, detector, settings: PrepareSettings) -> dict:
    """Extract and store one video's face clips; returns its meta record."""
    final = cache / entry_name(item.key)
    meta = {**asdict(item), "clips": 0, "frame_indices": [], "boxes": [], "error": None}
    images, frames = [], []
    try:
        info, _ = open_video(item.path, None)  # full size: training crops from unscaled frames
        tracker = faces_mod.LargestFace()
        for clip in sample_clips(info, settings.clips, settings.clip_len):
            for fc in clip_faces(item.path, clip, detector, tracker, settings):
                images.append(fc.image)
                frames.append(fc.frames)
                meta["frame_indices"].append(list(fc.frame_indices))
                meta["boxes"].append([round(v, 1) for v in fc.box])
    except DeepscanError as exc:
        meta["error"] = str(exc)
    meta["clips"] = len(images)
    # a unique temporary name: several processes (or nodes sharing the folder) may write at once
    tmp = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
        if images:
            np.save(tmp / "image.npy", np.stack(images))
            np.save(tmp / "frames.npy", np.stack(frames))
        (tmp / "meta.json").write_text(json.dumps(meta))
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(cache, exc) from None
    shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)  # atomic: the entry appears complete or not at all
    except OSError:  # another process finished the same video first: its entry stands
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def begin(cache: Path, settings: PrepareSettings, detector: str | None = None) -> None:
    """Check (or record) the cache's settings and detector, and remove what a killed run left
    half-written."""
    _check_settings(cache, settings, detector)
    for leftover in cache.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def pending(items: list[VideoItem], cache: Path, settings: PrepareSettings, detector: str | None,
            advance=None) -> tuple[dict, list[VideoItem]]:
    """Start (or go on with) a cache: the counts so far and the items not yet in it (local and Ray)."""
    begin(cache, settings, detector)
    counts = {"done_before": 0, "prepared": 0, "no_face": 0, "errors": 0}
    todo = []
    for item in items:
        if is_done(cache, item):
            counts["done_before"] += 1
            if advance:
                advance()
        else:
            todo.append(item)
    return counts, todo


def prepare(items: list[VideoItem], cache: str | Path, detector, settings: PrepareSettings, advance=None,
            workers: int = 0, say=None) -> dict:
    """Prepare every item not yet in the cache. Returns counts; ``say`` hears each video that
    failed. With ``workers`` > 0, ``detector`` is a ``faces.DetectorSpec`` and that many
    processes prepare videos side by side."""
    cache = Path(cache)
    counts, todo = pending(items, cache, settings, detector.name, advance)
    metas = (_in_processes(todo, cache, detector, settings, workers) if workers > 0 and todo
             else (prepare_video(item, cache, detector, settings) for item in todo))
    for meta in metas:
        counts["prepared"] += 1
        counts["errors"] += meta["error"] is not None
        counts["no_face"] += meta["error"] is None and meta["clips"] == 0
        if meta["error"] and say:
            say(meta["error"])
        if advance:
            advance()
    return counts


# concurrent.futures rather than workers.PreparePool: each video's clips go to disk here, so one
# small result per video is all a worker returns. What the executor lacks is isolation (a worker
# that dies breaks the whole pool), so that is added: after a death, the videos that were in
# flight are prepared again one at a time, and one that kills its process alone is an error.
_DETECTOR = None


def _start_worker(spec, run: int) -> None:
    global _DETECTOR
    _DETECTOR = spec.build()
    threading.Thread(target=_exit_with_run, args=(run,), daemon=True).start()


def _exit_with_run(run: int) -> None:
    """Stop once the run (process ``run``) is gone. A SIGKILLed run cannot stop its executor's
    processes, and nothing tells them: each holds both ends of its queue and keeps the fork server
    (their parent) alive, so without this they would wait for work for ever."""
    while True:
        time.sleep(0.2)
        try:
            os.kill(run, 0)
        except (ProcessLookupError, PermissionError):  # gone (or another user's process by now)
            os._exit(1)


def _prepare_in_worker(item: VideoItem, cache: str, settings: PrepareSettings) -> dict:
    return prepare_video(item, Path(cache), _DETECTOR, settings)


def _in_processes(todo: list[VideoItem], cache: Path, spec, settings: PrepareSettings, workers: int):
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    from dataclasses import replace

    from .scan.workers import _main_module_hidden, default_context

    if getattr(spec, "name", None) == "scrfd":
        spec = replace(spec, threads=1)  # one onnxruntime thread per process: the processes are the parallelism
    queue, suspects = deque(todo), deque()
    while queue or suspects:
        alone = bool(suspects)
        source, width = (suspects, 1) if alone else (queue, workers)
        pool = ProcessPoolExecutor(width, mp_context=default_context(), initializer=_start_worker,
                                   initargs=(spec, os.getpid()))
        inflight: dict = {}
        try:
            with _main_module_hidden():
                while source or inflight:
                    while source and len(inflight) < (1 if alone else 2 * width):
                        item = source.popleft()
                        inflight[pool.submit(_prepare_in_worker, item, str(cache), settings)] = item
                    done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                    for future in done:
                        meta = future.result()  # BrokenProcessPool if a worker died
                        del inflight[future]
                        yield meta
        except BrokenProcessPool:
            if alone:
                (item,) = inflight.values()
                yield {**asdict(item), "clips": 0, "error": f"{item.path}: the preparation process died on this "
                       "video (killed, or out of memory?); it is not cached, so the next run tries it again"}
            else:
                suspects.extend(inflight.values())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


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
        try:
            meta = json.loads(meta_path.read_text())
            clips = int(meta["clips"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ConfigError(f"{meta_path}: damaged; delete the folder {meta_path.parent} and run again "
                              "(that video is prepared again)") from None
        if clips:
            video = CachedVideo(item.key, item.label, item.split, item.method, clips, str(meta_path.parent))
            _check_arrays(video, _read_settings(cache))
            out.append(video)
    return out


def _check_arrays(video: CachedVideo, settings: dict | None) -> None:
    """A cached video's arrays must open, hold at least ``clips`` clips and have the cache's crop
    shapes: a truncated or foreign array is one line naming the folder to delete, before any epoch."""
    folder = Path(video.folder)

    def damaged(why: str) -> ConfigError:
        return ConfigError(f"{folder}: damaged face-clip cache entry ({why}); delete that folder and run again "
                           "(that video is prepared again)")

    try:
        image, frames = open_arrays(video)
    except (OSError, ValueError, EOFError) as exc:
        raise damaged(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}") from None
    if image.ndim != 4 or frames.ndim != 5 or image.shape[0] < video.clips or frames.shape[0] < video.clips:
        raise damaged(f"arrays of shapes {list(image.shape)} and {list(frames.shape)} for {video.clips} clips")
    if settings:
        s, n, lda = settings.get("image_size"), settings.get("clip_len"), settings.get("lda_size")
        if tuple(image.shape[1:]) != (s, s, 3) or tuple(frames.shape[1:]) != (n, lda, lda, 3):
            raise damaged(f"crops of {list(image.shape[1:])} and {list(frames.shape[1:])}, the cache's settings say "
                          f"{[s, s, 3]} and {[n, lda, lda, 3]}")


def open_arrays(video: CachedVideo) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(video.folder)
    return np.load(folder / "image.npy", mmap_mode="r"), np.load(folder / "frames.npy", mmap_mode="r")
