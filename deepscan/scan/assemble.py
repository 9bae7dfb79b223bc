"""Assembly: per-video state from the first event to the record, the verdict, the heatmap
frames, the record (built in one place, errors included), the table row, and the order records
leave in. ``Assembler`` is the one owner of a run's videos in flight: every count of what a
video still waits for changes here, and nowhere else.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from ..checkpoint import CheckpointInfo
from ..errors import io_reason
from .events import ClipMeta, Head, Tail
from .settings import ScanSettings

if TYPE_CHECKING:
    import numpy as np

SCHEMA = "deepscan.scan/1"

# A face must be confirmed before it counts: seen in two clips or more, or, seen once, with a
# detector score this sure. BlazeFace on the real faces here (carphone 176x144, the astronaut, two
# faces; every sampled clip searched in full) scored 0.665-0.97; its false faces, on skimage's
# photos blurred (letters, coins, a cat), 0.52-0.62 (docs/scanning.md "What confirms a face").
# dlib's HOG margins are another scale and were not measured: every dlib sighting counts.
CONFIRM_SINGLE = {"blazeface": 0.65, "scrfd": 0.65}


@dataclass
class FrameScore:
    index: int
    time_s: float
    score: float
    box: tuple[float, float, float, float]
    det_score: float = 1.0  # the detector's confidence in the face
    maps: dict | None = field(default=None, repr=False)  # component -> (m, 14, 14), heatmap candidates only
    crop: np.ndarray | None = field(default=None, repr=False)  # (s, s, 3) uint8, heatmap candidates only


@dataclass(frozen=True)
class Row:
    """What the summary table keeps of a video: one small row."""

    path: str
    verdict: str
    score: float | None
    faces: int
    frames: int
    seconds: float
    note: str


@dataclass
class VideoState:
    """One input while it is in flight; dropped once its record has been made."""

    index: int
    path: str
    t0: float
    head: Head = field(default_factory=Head)
    tail: Tail | None = None  # set when preparation ended
    error: str | None = None
    tracks: dict[int, list[FrameScore]] = field(default_factory=dict)
    left: int = 0  # clips sent and not yet scored (a decoded clip counts as one until the device prepares it)
    model_s: float = 0.0
    top: list = field(default_factory=list)  # heap of (score, seq, FrameScore) kept for heatmaps
    face_clips: int = 0  # counted here when the device prepares (the workers only decode)
    device_s: float = 0.0  # its share of device preparation steps


def aggregate(scores: list[float], how: str) -> float:
    import numpy as np  # (here: a scan --server client builds error records without numpy)

    if how == "median":
        return float(np.median(scores))
    if how == "max":
        return float(np.max(scores))
    return float(np.mean(scores))


def confirmed(frames: list[FrameScore], single: float) -> bool:
    """A track counts when it was seen in more than one clip, or once with a score >= ``single``."""
    return len(frames) > 1 or any(f.det_score >= single for f in frames)


def model_record(info: CheckpointInfo, checkpoint_sha: str, backend: str = "torch") -> dict:
    """What every record says of the model: its name (the published model's, else the file's
    stem), variant, checkpoint file and sha256, licence (the checkpoint's, null when it states
    none), whether it is untrained, and the runtime."""
    return {"name": info.name, "variant": info.variant, "checkpoint": Path(info.path).name, "sha256": checkpoint_sha,
            "license": info.license, "untrained": info.untrained, "backend": backend}


def build_record(path: str, *, settings: ScanSettings, model: dict, detector: str, head: Head | None = None,
                 verdict: str = "error", score: float | None = None, error: str | None = None,
                 video: dict | None = None, sampling: dict | None = None, tracks: list | None = None,
                 unconfirmed: list | None = None, warnings: list | None = None, timings: dict | None = None,
                 heatmaps: str | None = None) -> dict:
    """A scan's record (schema ``deepscan.scan/1``, docs/output.md): the one place it is built."""
    head = head or Head()
    return {
        "schema": SCHEMA,
        "path": path,
        "sha256": head.sha256,
        "file": head.file,
        "verdict": verdict,
        "score": None if score is None else round(score, 6),
        "threshold": settings.threshold,
        "aggregation": settings.aggregation,
        "error": error,
        "model": model,
        "detector": detector,
        "settings": settings.record(),
        "video": video,
        "sampling": sampling or {},
        "tracks": tracks or [],
        "unconfirmed": unconfirmed or [],
        "warnings": warnings or [],
        "timings": {k: round(v, 3) for k, v in (timings or {}).items()},
        "heatmaps": heatmaps,
    }


def error_record(path: str, error: str, *, settings: ScanSettings, model: dict, detector: str) -> dict:
    """The record of an input that never reached preparation (e.g. a folder without videos)."""
    return build_record(path, error=error, settings=settings, model=model, detector=detector)


def row_of(record: dict) -> Row:
    """The summary-table row of a record: the one row builder (local scans and Ray alike)."""
    error = record.get("error") or ""
    path = record["path"]
    if error.startswith(path + ": "):
        error = error[len(path) + 2:]
    note = error or "; ".join(record.get("warnings") or []) or (
        f"heatmaps: {record['heatmaps']}" if record.get("heatmaps") else "")
    tracks = record.get("tracks") or []
    return Row(path, record["verdict"], record.get("score"), len(tracks), sum(len(t["frames"]) for t in tracks),
               round(float((record.get("timings") or {}).get("total_s", 0.0)), 2), note)


def exit_code(verdicts: Counter | Iterable[str]) -> int:
    """Antivirus convention: 1 if anything is fake, else 2 if anything failed, else 0."""
    counts = verdicts if isinstance(verdicts, Counter) else Counter(verdicts)
    if counts.get("fake"):
        return 1
    if counts.get("error"):
        return 2
    return 0


def _video_with_frames(video: dict | None, frames: int | None) -> dict | None:
    """The record's ``video``, with ``frames`` the length the sampling used (decoding may have
    found the header's estimate wrong and counted again)."""
    if video is None or not frames:
        return video
    return {**video, "frames": frames}


class Assembler:
    """A run's videos in flight, their records, and the order those leave in (input order, each
    as soon as the ones before it have left)."""

    def __init__(self, settings: ScanSettings, *, model: dict, detector: str, heatmaps: Path | None = None,
                 on_device: bool = False, on_complete=None):
        self.settings, self.model, self.detector, self.heatmaps = settings, model, detector, heatmaps
        self.on_device = on_device
        self.on_complete = on_complete  # called with a video's index when its record is made
        self.keep = settings.keep_crops if heatmaps is not None else 0
        self.videos: dict[int, VideoState] = {}
        self.verdicts: Counter = Counter()
        self._ready: dict[int, tuple[dict, Row]] = {}  # index -> (record, row) waiting for earlier ones
        self._next = 0  # the next index to leave
        self._seq = 0

    # ---- what happens to a video
    def open(self, index: int, path: str, error: str | None = None) -> None:
        """Input ``index`` enters (``error``: known bad before reading; its record is ready at once)."""
        vs = self.videos[index] = VideoState(index, path, time.perf_counter())
        if error:
            vs.error, vs.tail = error, Tail()
            self._complete(vs)

    def started(self, index: int, head: Head) -> None:
        if index in self.videos:
            self.videos[index].head = head

    def expect(self, index: int, clips: int = 1) -> None:
        """``clips`` more clips of input ``index`` are on their way to the model."""
        self.videos[index].left += clips

    def prepared(self, index: int, face_clips: int, seconds: float) -> None:
        """A decoded clip of ``index`` became ``face_clips`` face clips on the device."""
        vs = self.videos[index]
        vs.left += face_clips - 1
        vs.face_clips += face_clips
        vs.device_s += seconds
        self._maybe_complete(vs)

    def dropped(self, index: int, clips: int) -> None:
        """``clips`` of ``index`` will never be scored (the video failed)."""
        self.videos[index].left -= clips

    def ended(self, index: int, tail: Tail, error: str | None = None) -> None:
        """Preparation of ``index`` ended (``error``: it was lost; else the tail's)."""
        vs = self.videos[index]
        vs.tail, vs.error = tail, error or tail.error
        self._maybe_complete(vs)

    def failed(self, index: int) -> bool:
        vs = self.videos.get(index)
        return vs is not None and vs.error is not None

    def scored(self, entries: list[tuple[int, ClipMeta]], probs, maps: dict, seconds: float, frames) -> None:
        """A batch's scores: into the tracks and the heatmap candidates of their videos."""
        share = seconds / max(1, len(entries))
        touched = set()
        for j, (index, meta) in enumerate(entries):
            vs = self.videos.get(index)
            if vs is None:
                continue
            vs.left -= 1
            touched.add(index)
            if vs.error:
                continue
            vs.model_s += share
            if not math.isfinite(float(probs[j])):  # never a NaN verdict: the video fails, loudly
                vs.error = (f"{vs.path}: the model gave a non-finite score (a numerical overflow?); "
                            "try --precision fp32, or check the checkpoint")
                continue
            fs = FrameScore(meta.frame_index, meta.time_s, float(probs[j]), meta.box, meta.det_score)
            vs.tracks.setdefault(meta.track_id, []).append(fs)
            if self.keep and self._candidate(vs, fs):
                crop = frames[j, 0]
                fs.crop = crop.cpu().numpy() if hasattr(crop, "cpu") else crop.copy()
                fs.maps = {k: v[j].copy() for k, v in maps.items()}
        for index in touched:
            self._maybe_complete(self.videos[index])

    def _candidate(self, vs: VideoState, fs: FrameScore) -> bool:
        """Keep ``fs`` among the video's ``keep`` most suspicious frames? (a bounded heap)"""
        self._seq += 1
        item = (fs.score, self._seq, fs)
        if len(vs.top) < self.keep:
            heapq.heappush(vs.top, item)
        elif fs.score > vs.top[0][0]:
            heapq.heapreplace(vs.top, item)
        else:
            return False
        return True

    def _maybe_complete(self, vs: VideoState) -> None:
        if vs.tail is not None and vs.left == 0 and vs.index in self.videos:
            self._complete(vs)

    def _complete(self, vs: VideoState) -> None:
        """Turn a finished video into its record and row; drop everything per frame."""
        del self.videos[vs.index]
        if self.on_complete is not None:
            self.on_complete(vs.index)
        record = self._record(vs)
        self._ready[vs.index] = (record, row_of(record))
        self.verdicts[record["verdict"]] += 1

    # ---- the record
    def _record(self, vs: VideoState) -> dict:
        s = self.settings
        tail = vs.tail or Tail()
        warnings = list(tail.warnings)
        score, verdict, track_scores, unconfirmed = None, "error", {}, []
        if vs.error is None:
            sure = CONFIRM_SINGLE.get(self.detector, 0.0)
            unconfirmed = sorted(tid for tid, fr in vs.tracks.items() if not confirmed(fr, sure))
            if unconfirmed:
                warnings.append(f"{len(unconfirmed)} face candidate(s) seen in one clip only with a detector score "
                                f"below {sure}: not scored into the verdict (record: unconfirmed)")
            if len(unconfirmed) < len(vs.tracks):
                track_scores = {tid: aggregate([f.score for f in fr], s.aggregation) for tid, fr in vs.tracks.items()
                                if tid not in unconfirmed}
                score = max(track_scores.values())  # a video is as fake as its most fake track
                verdict = "fake" if score >= s.threshold else "real"
            else:
                verdict = "no-face"
        folder = None
        if self.heatmaps is not None and vs.top and verdict in ("fake", "real"):
            folder = self._heatmaps(vs, verdict, score, unconfirmed, track_scores, warnings)
        vs.top = []
        scale = vs.head.box_scale
        timings = dict(tail.timings)
        sampling = tail.sampling
        if self.on_device and sampling:  # the workers only decoded: faces were counted here
            sampling = {**sampling, "face_clips": vs.face_clips}
            timings["detect_crop_s"] = vs.device_s
        timings["model_s"] = vs.model_s
        timings["total_s"] = time.perf_counter() - vs.t0
        return build_record(
            vs.path, settings=s, model=self.model, detector=self.detector, head=vs.head, verdict=verdict, score=score,
            error=vs.error, video=_video_with_frames(vs.head.video, tail.video_frames), sampling=sampling,
            tracks=[{"id": tid, "score": round(track_scores[tid], 6),
                     "frames": [{"index": f.index, "time_s": f.time_s, "score": round(f.score, 6),
                                 "box": [round(v * scale, 1) for v in f.box]}
                                for f in sorted(frames, key=lambda f: f.index)]}  # time order, whichever lane was first
                    # an error keeps no tracks, even when clips of it were scored before its worker died
                    for tid, frames in sorted(vs.tracks.items()) if tid in track_scores],
            unconfirmed=[{"id": tid, "frames": [{"index": f.index, "time_s": f.time_s,
                                                 "detector_score": round(f.det_score, 4),
                                                 "box": [round(v * scale, 1) for v in f.box]} for f in vs.tracks[tid]]}
                         for tid in unconfirmed],
            warnings=warnings, timings=timings, heatmaps=folder)

    def _heatmaps(self, vs: VideoState, verdict: str, score: float, unconfirmed: list, track_scores: dict,
                  warnings: list) -> str | None:
        from ..heatmaps import write_heatmaps

        doubtful = {id(f) for tid in unconfirmed for f in vs.tracks[tid]}
        frames = [f for _, _, f in sorted(vs.top, key=lambda t: (-t[0], t[1])) if id(f) not in doubtful]
        try:
            timeline = ({tid: [(f.time_s, f.score) for f in fr] for tid, fr in vs.tracks.items()
                         if tid in track_scores}, self.settings.threshold)
            return write_heatmaps(vs.path, verdict, score, frames, self.heatmaps, timeline) if frames else None
        except (OSError, ValueError) as exc:
            warnings.append(f"heatmaps not written ({io_reason(exc)})")
            return None

    # ---- the order records leave in
    def take(self) -> Iterator[tuple[dict, Row]]:
        """The records whose turn has come, in input order."""
        while self._next in self._ready:
            item = self._ready.pop(self._next)
            self._next += 1
            yield item

    def flush(self) -> Iterator[tuple[dict, Row]]:
        """After an interruption: every complete record still waiting, in input order."""
        for index in sorted(self._ready):
            yield self._ready.pop(index)

    @property
    def emitted(self) -> int:
        return self._next

    @property
    def idle(self) -> bool:
        return not self.videos and not self._ready
