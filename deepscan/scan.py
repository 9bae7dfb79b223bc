"""A scan: videos in, one result per input out.

decode (video.py) -> detect, track, crop (faces.py) -> batches through the model (here) ->
per-frame P(fake) -> per-track score (mean, paper) -> per-video score (the most fake track).

Preparing a video (decode + detect + crop) runs in a background thread ahead of the model,
and batches mix face clips of several videos; a video's result is emitted as soon as all its
clips are scored. Any failure of one input becomes that input's ``error`` result.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import faces as faces_mod
from .checkpoint import CheckpointInfo
from .errors import ConfigError, DeepscanError, MediaError
from .model import LDADetector, fold_batchnorm, input_normaliser
from .output import debug_enabled
from .weights import sha256_file
from .video import DecodeReport, check_readable, plan_clips, probe, read_clips

SCHEMA = "deepscan.scan/1"
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp")
AGGREGATIONS = ("mean", "median", "max")


@dataclass(frozen=True)
class ScanSettings:
    clips: int = 32  # K clips per video (SPEC §2)
    threshold: float = 0.5
    aggregation: str = "mean"  # frame -> track score; the paper uses the mean
    batch_size: int = 8
    min_face: int = faces_mod.MIN_FACE
    margin: float = faces_mod.CROP_MARGIN
    strategy: str = "auto"  # decoding: auto | select | seek
    hash_files: bool = True
    keep_crops: int = 4  # most suspicious face clips kept per video for heatmaps (0: none)

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"--aggregate must be one of {', '.join(AGGREGATIONS)}")
        if self.clips < 1 or self.batch_size < 1:
            raise ConfigError("--clips and --batch-size must be >= 1")


@dataclass
class FrameScore:
    index: int
    time_s: float
    score: float
    box: tuple[float, float, float, float]
    maps: dict = field(default_factory=dict, repr=False)  # component -> (m, 14, 14) float
    crop: np.ndarray | None = field(default=None, repr=False)  # (s, s, 3) uint8, LDA size


@dataclass
class VideoResult:
    path: str
    verdict: str = "error"
    score: float | None = None
    error: str | None = None
    sha256: str | None = None
    video: dict | None = None
    sampling: dict = field(default_factory=dict)
    tracks: dict[int, list[FrameScore]] = field(default_factory=dict)
    track_scores: dict[int, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    heatmaps: str | None = None
    box_scale: float = 1.0  # decoded frame -> displayed video pixels (frames over MAX_SIDE are scaled down)

    def to_json(self, *, threshold: float, model: dict, detector: str, aggregation: str = "mean") -> dict:
        return {
            "schema": SCHEMA,
            "path": self.path,
            "sha256": self.sha256,
            "verdict": self.verdict,
            "score": None if self.score is None else round(self.score, 6),
            "threshold": threshold,
            "aggregation": aggregation,
            "error": self.error,
            "model": model,
            "detector": detector,
            "video": self.video,
            "sampling": self.sampling,
            "tracks": [
                {
                    "id": tid,
                    "score": round(self.track_scores[tid], 6),
                    "frames": [
                        {"index": f.index, "time_s": f.time_s, "score": round(f.score, 6),
                         "box": [round(v * self.box_scale, 1) for v in f.box]}
                        for f in frames
                    ],
                }
                for tid, frames in sorted(self.tracks.items())
            ],
            "warnings": self.warnings,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "heatmaps": self.heatmaps,
        }


# ---------------------------------------------------------------------------- inputs
def expand_inputs(paths: Iterable[str | os.PathLike], pattern: str | None = None) -> list[tuple[str, str | None]]:
    """(path, error) pairs: files as given, folders searched recursively for videos.

    A folder yields its video files (by extension, or matching ``pattern``), sorted; a folder
    without any yields one error entry. Links to folders are not followed (no loops).
    """
    out: list[tuple[str, str | None]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p, followlinks=False):
                dirs.sort()
                for name in sorted(files):
                    f = Path(root, name)
                    if f.match(pattern) if pattern else f.suffix.lower() in VIDEO_EXTENSIONS:
                        found.append(str(f))
            if not found:
                what = f"matching {pattern!r}" if pattern else f"with a video extension ({', '.join(VIDEO_EXTENSIONS[:5])}, ...)"
                out.append((str(p), f"{p}: folder holds no files {what}; use --glob to choose others"))
            out.extend((f, None) for f in found)
        else:
            out.append((str(raw), None))
    return out


# ---------------------------------------------------------------------------- devices
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    probe_fn = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe_fn and probe_fn()) or (amx and amx()))


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16 / AMX), else fp32."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in table:
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, not {name!r}")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 is for CUDA; on CPU use bf16 or fp32")
    return table[name]


class Runner:
    """Face clips -> P(fake) and attention maps, in batches, on one device and precision.

    With ``use_compile``, the model goes through torch.compile (inductor, weights frozen on CPU) the
    first time it runs; batches are padded to ``batch_size`` so that one graph serves them all.
    Should compilation fail (no C++ compiler, an unsupported GPU...), the runner says so through
    ``say`` and carries on uncompiled."""

    def __init__(self, model: LDADetector, device: torch.device, dtype: torch.dtype, *,
                 use_compile: bool = False, batch_size: int = 8, say: Callable[[str], None] | None = None):
        self.cfg = model.config
        self.device, self.dtype = device, dtype
        # The runner owns the model: batch norms are folded into their convolutions in place.
        self.model = fold_batchnorm(model.to(device))
        if device.type == "cpu" or dtype != torch.float32:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._to_input = input_normaliser(self.cfg, device)
        self.batch_size, self.say = batch_size, say
        self._forward = compile_model(self.model, device) if use_compile else self.model
        self.compiled = use_compile

    def forward(self, image: torch.Tensor, frames: torch.Tensor | None):
        """(logits, maps) for normalised inputs, compiled when asked and possible."""
        try:
            return self._forward(image, frames, return_maps=True)
        except Exception as exc:  # noqa: BLE001 - any compiler failure; eager is always there
            if not self.compiled:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if self.say:
                self.say(f"note: --compile failed ({type(exc).__name__}: {first}); running uncompiled")
            self._forward, self.compiled = self.model, False
            return self.model(image, frames, return_maps=True)

    @torch.inference_mode()
    def __call__(self, clips: list[faces_mod.FaceClip]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        images = np.stack([c.image for c in clips])
        frames = None if self.cfg.variant == "xception" else np.stack([c.frames for c in clips])
        n = len(clips)
        if self.compiled and n < self.batch_size:  # one shape for the compiled graph
            images = _pad(images, self.batch_size)
            frames = None if frames is None else _pad(frames, self.batch_size)
        autocast = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            logits, maps = self.forward(self._to_input(images), None if frames is None else self._to_input(frames))
        probs = torch.softmax(logits[:n].float(), dim=1)[:, 1].cpu().numpy()
        return probs, {k: v[:n].float().cpu().numpy() for k, v in maps.items()}


def _pad(batch: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])


def compile_model(model: LDADetector, device: torch.device):
    """torch.compile for inference: fixed shapes; on CPU, inductor freezes the weights (constant
    folding, prepacked oneDNN convolutions). Compilation itself happens on the first call."""
    import logging

    import torch._inductor.config as inductor_config

    if device.type == "cpu":
        inductor_config.freezing = True
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" noise
    return torch.compile(model, dynamic=False)


# ---------------------------------------------------------------------------- preparing
@dataclass
class Started:
    """A video's preparation began (its result is filled in as it goes)."""

    index: int
    result: VideoResult
    t0: float


@dataclass
class Cropped:
    """Face clips of one sampled clip of video ``index``."""

    index: int
    clips: list


@dataclass
class Prepared:
    """A video's preparation ended; its face clips were sent before as Cropped events."""

    index: int


def prepare_events(index: int, path: str, detector, cfg, settings: ScanSettings) -> Iterator:
    """Decode, detect, track and crop one video, yielding face clips as soon as they exist.

    Yields Started, then Cropped events, then Prepared. Errors become the result's error.
    """
    res = VideoResult(path=path)
    yield Started(index, res, time.perf_counter())
    count = 0
    try:
        check_readable(path)
        if settings.hash_files:
            res.sha256 = sha256_file(path)
        info = probe(path)
        res.box_scale = info.source_width / info.width
        res.video = {"width": info.source_width, "height": info.source_height, "fps": round(info.fps, 3),
                     "duration_s": round(info.duration, 3), "rotation": info.rotation, "codec": info.codec}
        clip_len = cfg.clip_len
        starts = plan_clips(info.num_frames, settings.clips, clip_len)
        if not starts:
            if info.num_frames == 0 and info.duration == 0:
                starts = [0]  # unknown length (no duration in the header): try the first frames
            else:
                raise MediaError(f"{path}: only {info.num_frames} frame(s), fewer than the {clip_len} "
                                 f"consecutive frames the {cfg.variant} model needs; use a longer video")
        report = DecodeReport()
        tracker = faces_mod.Tracker()
        res.timings.update(decode_s=0.0, detect_crop_s=0.0)
        t = time.perf_counter()
        for clip in read_clips(info, starts, clip_len, settings.strategy, report):
            t1 = time.perf_counter()
            res.timings["decode_s"] += t1 - t
            dets = faces_mod.filter_faces(detector(clip.frames[0], hints=tracker.recent()), settings.min_face)
            ids = tracker.assign(dets)
            fcs = faces_mod.face_clips(path, clip, dets, ids, cfg.image_size, cfg.lda_size, settings.margin)
            t = time.perf_counter()
            res.timings["detect_crop_s"] += t - t1
            if fcs:
                count += len(fcs)
                yield Cropped(index, fcs)
        res.sampling = {"clips": len(starts), "n": clip_len, "decoded_clips": report.decoded,
                        "frames": report.decoded * clip_len, "face_clips": count, "strategy": report.strategy}
        if report.warning:
            res.warnings.append(report.warning)
        if report.decoded == 0:
            raise MediaError(f"{path}: no clip of {clip_len} consecutive frames could be decoded; "
                             "the file is damaged, truncated or too short")
        if not count:
            res.verdict = "no-face"
    except DeepscanError as exc:
        res.error, res.verdict = str(exc), "error"
    except Exception as exc:  # an unexpected failure must not stop the other inputs
        if debug_enabled():
            traceback.print_exc()
        res.error, res.verdict = f"{path}: unexpected {type(exc).__name__}: {exc}", "error"
    yield Prepared(index)


class Prefetch:
    """Iterate ``items`` in a background thread, at most ``depth`` ahead of the consumer.

    The thread works in bursts: once the queue is full it rests until the consumer has taken
    three quarters of it. ``busy`` says whether it is working right now, so that a CPU model can
    leave it a core for the burst and have them all the rest of the time (see ``scan``)."""

    _done = object()

    def __init__(self, items: Iterable, depth: int = 2):
        self._items, self._q = iter(items), queue.Queue(maxsize=depth)
        self._low = depth // 4
        self._stop = threading.Event()
        self.busy = False

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                if self._q.full():
                    self.busy = False
                    while self._q.qsize() > self._low and not self._stop.is_set():
                        time.sleep(0.005)
                    continue
                self.busy = True
                try:
                    item = next(self._items)
                except StopIteration:
                    break
                self._q.put(item)  # there is room: this is the only producer
        except BaseException as exc:  # surfaced in the consumer
            self._put(exc)
        finally:
            self.busy = False
        self._put(self._done)

    def _put(self, item) -> None:
        """Put unless the consumer has gone (then nobody would ever make room)."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator:
        threading.Thread(target=self._work, daemon=True).start()
        try:
            while (item := self._q.get()) is not self._done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()


# ---------------------------------------------------------------------------- scoring
def aggregate(scores: list[float], how: str) -> float:
    if how == "median":
        return float(np.median(scores))
    if how == "max":
        return float(np.max(scores))
    return float(np.mean(scores))


def finish(res: VideoResult, settings: ScanSettings) -> VideoResult:
    if res.error is None and res.tracks:
        res.track_scores = {tid: aggregate([f.score for f in frames], settings.aggregation)
                            for tid, frames in res.tracks.items()}
        res.score = max(res.track_scores.values())  # a video is as fake as its most fake track
        res.verdict = "fake" if res.score >= settings.threshold else "real"
        # keep crops only for the most suspicious face clips (heatmaps)
        ranked = sorted((f for fr in res.tracks.values() for f in fr), key=lambda f: -f.score)
        for f in ranked[settings.keep_crops:]:
            f.crop = None
    elif res.error is None and res.verdict != "no-face":
        res.verdict = "no-face"
    return res


def scan(paths: list[tuple[str, str | None]], runner: Runner, detector, settings: ScanSettings,
         on_result: Callable[[VideoResult], None]) -> list[VideoResult]:
    """Scan every input, calling ``on_result`` as each finishes (input order kept).

    Preparation runs in a background thread (``Prefetch``) while the model scores batches of
    ``settings.batch_size`` face clips, which may mix videos (on a multi-threaded CPU, in steps
    of 2 clips: see ``score``).
    """
    cfg = runner.cfg
    results: list[VideoResult | None] = [None] * len(paths)
    state: dict[int, dict] = {}  # index -> {"res", "t0", "left" (unscored clips), "prepared", "model_s"}
    pending: list[tuple[int, faces_mod.FaceClip]] = []
    next_emit = 0

    def produce():
        for i, (path, err) in enumerate(paths):
            if err:
                yield Started(i, VideoResult(path=path, error=err), time.perf_counter())
                yield Prepared(i)
            else:
                yield from prepare_events(i, path, detector, cfg, settings)

    def maybe_complete(i: int) -> None:
        nonlocal next_emit
        st = state[i]
        if not st["prepared"] or st["left"]:
            return
        res = st["res"]
        res.timings["model_s"] = st["model_s"]
        res.timings["total_s"] = time.perf_counter() - st["t0"]
        results[i] = finish(res, settings)
        del state[i]
        while next_emit < len(paths) and results[next_emit] is not None:
            on_result(results[next_emit])
            next_emit += 1

    # Up to 64 events prepared ahead (each sampled clip's faces, ~1 MB per face), two batches at least.
    feed = Prefetch(produce(), depth=max(64, 2 * settings.batch_size))
    # On CPU a model thread that shares its core with preparation stalls the others at every
    # parallel region (2 cores: batches 2.4-3x slower beside any busy thread), while one thread
    # alone runs at 0.56x of two. So while preparation is working the model leaves it a core, in
    # steps of 2 clips (CPU clips/s hardly depends on the batch size), and takes them all again
    # as soon as it rests: 10-15 % less end-to-end time on 2 cores.
    threads = torch.get_num_threads()
    share_cores = runner.device.type == "cpu" and threads > 1

    def score(clips: list[faces_mod.FaceClip]):
        if not share_cores:
            return runner(clips)
        step = runner.batch_size if runner.compiled else 2
        parts = []
        for k in range(0, len(clips), step):
            torch.set_num_threads(threads - 1 if feed.busy else threads)
            parts.append(runner(clips[k:k + step]))
        return (np.concatenate([p for p, _ in parts]),
                {key: np.concatenate([m[key] for _, m in parts]) for key in parts[0][1]})

    def run_batch(batch) -> None:
        t = time.perf_counter()
        probs, maps = score([fc for _, fc in batch])
        share = (time.perf_counter() - t) / len(batch)
        for j, (i, fc) in enumerate(batch):
            st = state[i]
            st["model_s"] += share
            st["left"] -= 1
            st["res"].tracks.setdefault(fc.track_id, []).append(
                FrameScore(fc.frame_indices[0], fc.times[0], float(probs[j]), fc.box,
                           {k: v[j] for k, v in maps.items()}, fc.frames[0]))
        for i in {i for i, _ in batch}:
            maybe_complete(i)

    def drain(full_only: bool) -> None:
        nonlocal pending
        while len(pending) >= (settings.batch_size if full_only else 1):
            batch, pending = pending[: settings.batch_size], pending[settings.batch_size:]
            run_batch(batch)

    try:
        for event in feed:
            if isinstance(event, Started):
                state[event.index] = {"res": event.result, "t0": event.t0, "left": 0, "prepared": False, "model_s": 0.0}
            elif isinstance(event, Cropped):
                state[event.index]["left"] += len(event.clips)
                pending.extend((event.index, fc) for fc in event.clips)
                drain(full_only=True)
            else:
                state[event.index]["prepared"] = True
                maybe_complete(event.index)
        drain(full_only=False)
    finally:
        torch.set_num_threads(threads)
    return [r for r in results if r is not None]


def model_record(info: CheckpointInfo, checkpoint_sha: str) -> dict:
    return {"variant": info.variant, "checkpoint": Path(info.path).name, "sha256": checkpoint_sha,
            "untrained": info.untrained}


def exit_code(results: list[VideoResult]) -> int:
    """Antivirus convention: 1 if anything is fake, else 2 if anything failed, else 0."""
    if any(r.verdict == "fake" for r in results):
        return 1
    if any(r.verdict == "error" for r in results):
        return 2
    return 0
