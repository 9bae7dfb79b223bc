"""A scan: inputs in, one record per input out, at any scale on one machine.

    plan (inputs.py) -> prepare (workers.py: worker processes) -> score (model lanes: one thread
    per GPU, single-threaded lanes on CPU) -> assemble (here: tracks, verdict, heatmaps, record)
    -> sink (the caller's ``on_record``)

Preparation (decode, detect, track, crop) runs in worker processes that hand face clips over
through shared memory (with ``preparation="device"`` they only decode and hand frames over, and
the scanning process detects, tracks and crops on the model's device: ``device_prep``; NVDEC
threads may decode instead: ``nvdec``); batches mix clips of several videos; each GPU has a scorer thread with
its own model replica, the CPU several lanes on one model (``cpu_lanes``); records leave in
input order as soon as a video's last clip is scored, and nothing per frame survives them.
Memory depends on the number of workers, slots and the batch size, never on the number of
inputs. Any failure of one input becomes that input's ``error`` record.
"""

from __future__ import annotations

import copy
import functools
import heapq
import math
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch

from . import faces as faces_mod
from .checkpoint import CheckpointInfo
from .config import CROP_MARGIN
from .errors import ConfigError, DeepscanError, io_reason
from .inputs import ScanInput
from .model import LDADetector, fold_batchnorm, input_normaliser
from .workers import PreparePool, PrepSettings, cpu_count

SCHEMA = "deepscan.scan/1"
AGGREGATIONS = ("mean", "median", "max")
PREPARATIONS = ("workers", "device")
DEVICE_SLOTS = 6  # slots per worker handing over frames: a clip's frames are 8-19 MB (720p-1080p)
NVDEC_NEEDS_DEVICE = "--decoder nvdec needs --preparation device (NVDEC's frames stay on the GPU)"
ALIGNED_NEEDS_WORKERS = ("this checkpoint's faces are aligned on their landmarks, which only the preparation workers "
                         "do so far; use --preparation workers (or auto)")


@dataclass(frozen=True)
class ScanSettings:
    clips: int = 32  # K clips per video (SPEC §2)
    threshold: float = 0.5
    aggregation: str = "mean"  # frame -> track score; the paper uses the mean
    batch_size: int = 8
    min_face: int = faces_mod.MIN_FACE
    margin: float = CROP_MARGIN
    strategy: str = "auto"  # decoding: auto | select | seek
    hash_files: bool = True
    keep_crops: int = 4  # most suspicious face clips kept per video for heatmaps (0: none)
    timeout_s: float = 600.0  # an input whose preparation makes no progress this long is abandoned
    preparation: str = "workers"  # workers: they detect and crop; device: they decode, the model's device does the rest
    decoder: str = "ffmpeg"  # ffmpeg (in the workers) or nvdec (threads here, with preparation on the device)
    alignment: str = "none"  # the checkpoint's: "deepfakebench-5pt" aligns crops on the landmarks (faces.ALIGNMENTS)

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"--aggregate must be one of {', '.join(AGGREGATIONS)}")
        if self.clips < 1 or self.batch_size < 1:
            raise ConfigError("--clips and --batch-size must be >= 1")
        if self.min_face < 1:
            raise ConfigError(f"--min-face must be at least 1 pixel, not {self.min_face}")
        if not self.timeout_s > 0:  # (NaN too)
            raise ConfigError(f"--timeout must be a number of seconds > 0, not {self.timeout_s}")
        if self.decoder not in ("ffmpeg", "nvdec"):
            raise ConfigError(f"--decoder must be auto, ffmpeg or nvdec, not {self.decoder!r}")
        if self.decoder == "nvdec" and self.preparation != "device":
            raise ConfigError(NVDEC_NEEDS_DEVICE)
        if self.preparation not in PREPARATIONS:
            raise ConfigError(f"--preparation must be auto, {' or '.join(PREPARATIONS)}, not {self.preparation!r}")
        if self.alignment not in faces_mod.ALIGNMENTS:
            raise ConfigError(f"alignment must be one of {', '.join(faces_mod.ALIGNMENTS)}, not {self.alignment!r}")
        if self.alignment != "none" and self.preparation == "device":
            raise ConfigError(ALIGNED_NEEDS_WORKERS)

    def record(self) -> dict:
        """The settings every record carries besides threshold and aggregation (what --resume
        compares, with the checkpoint and the detector)."""
        return {"clips": self.clips, "min_face": self.min_face}

    def prep(self, cfg, max_side: int | None = None) -> PrepSettings:
        from .video import MAX_SIDE

        return PrepSettings(clips=self.clips, clip_len=cfg.clip_len, image_size=cfg.image_size,
                            lda_size=cfg.lda_size, margin=self.margin, min_face=self.min_face,
                            strategy=self.strategy, hash_files=self.hash_files, max_side=max_side or MAX_SIDE,
                            handover="frames" if self.preparation == "device" else "crops",
                            alignment=self.alignment)


# ---------------------------------------------------------------------------- devices
def pick_device(name: str = "auto") -> torch.device:
    (dev,) = pick_devices(name)[:1]
    return dev


def pick_devices(name: str = "auto") -> list[torch.device]:
    """``auto``: every visible GPU, else the CPU; ``cuda``: every visible GPU; ``cpu``;
    ``cuda:N``; or a comma-separated list such as ``cuda:0,cuda:2``."""
    name = name.strip()
    if name == "auto":
        return pick_devices("cuda") if torch.cuda.is_available() else [torch.device("cpu")]
    out = []
    for part in [p.strip() for p in name.split(",") if p.strip()] or [name]:
        if part != "cpu" and not (part == "cuda" or (part.startswith("cuda:") and part[5:].isdigit())):
            raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or a list like cuda:0,cuda:2, not {name!r}")
        if part.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
            count = torch.cuda.device_count()
            if part == "cuda":
                out += [torch.device("cuda", i) for i in range(count)]
                continue
            if int(part[5:]) >= count:
                raise ConfigError(f"--device {part}: torch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
        out.append(torch.device(part))
    if len(set(out)) != len(out):
        raise ConfigError(f"--device {name!r} names a device twice")
    return out


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


def pick_decoder(name: str, preparation: str, device: torch.device, say=None, module=None) -> str:
    """``auto``: NVDEC when the device prepares on a GPU and NVDEC works there (one check; one
    notice when it does not), else ffmpeg in the workers; ``nvdec`` must work or is refused."""
    if name not in ("auto", "ffmpeg", "nvdec"):
        raise ConfigError(f"--decoder must be auto, ffmpeg or nvdec, not {name!r}")
    if name == "ffmpeg" or (name == "auto" and (preparation != "device" or device.type != "cuda")):
        return "ffmpeg"
    if preparation != "device":
        raise ConfigError(NVDEC_NEEDS_DEVICE)
    from .nvdec import available

    why = available(device, module) if device.type == "cuda" or module is not None else "NVDEC needs a CUDA device"
    if why is None:
        return "nvdec"
    if name == "nvdec":
        raise ConfigError(f"--decoder nvdec: {why}; use --decoder ffmpeg")
    if say:
        say(f"note: decoding with ffmpeg: {why}")
    return "ffmpeg"


def pick_preparation(name: str, detector: str, alignment: str = "none") -> str:
    """``auto``: the workers, on every device, until a GPU run has measured device preparation
    (benchmarks/gpu.sh; on this project's CPUs the workers are faster: README 'Preparation on
    the device');
    ``device`` runs BlazeFace in torch, so it takes no other detector, and cuts square crops only
    (a checkpoint whose faces are aligned needs the workers)."""
    if name == "auto":
        return "workers"
    if name not in PREPARATIONS:
        raise ConfigError(f"--preparation must be auto, {' or '.join(PREPARATIONS)}, not {name!r}")
    if name == "device" and alignment != "none":
        raise ConfigError(ALIGNED_NEEDS_WORKERS)
    if name == "device" and detector != "blazeface":
        raise ConfigError(f"--preparation device runs BlazeFace on the model's device; it cannot run --detector "
                          f"{detector} (use --detector blazeface, or --preparation workers)")
    return name


def default_batch_size(device: str) -> int:
    """--batch-size when not given: 8 on CPU (clips/s hardly depends on it there), 64 on CUDA
    (on an H200 in bf16: 2,552 / 2,695 / 2,800 clips/s at 32 / 64 / 128, 2.5 GB at 64)."""
    return 64 if pick_devices(device)[0].type == "cuda" else 8


def default_workers(devices: list[torch.device]) -> int:
    """Preparation workers when --workers is not given: every core on a GPU machine; on CPU
    every core but one for the model (2 cores: 1 worker; see README 'Performance')."""
    cores = cpu_count()
    if any(d.type == "cuda" for d in devices):
        return cores
    return max(1, cores - 1)


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
        self.threads = torch.get_num_threads()  # CPU threads, as set where the runner is made
        self._first = threading.Lock() if use_compile else None  # several lanes: compile once

    def forward(self, image: torch.Tensor, frames: torch.Tensor | None):
        """(logits, maps) for normalised inputs, compiled when asked and possible. The first call
        compiles; lanes that call meanwhile wait for it rather than compile again."""
        first = self._first
        if first is not None:
            with first:
                out = self._call(image, frames)
                self._first = None
                return out
        return self._call(image, frames)

    def _call(self, image: torch.Tensor, frames: torch.Tensor | None):
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
    def score(self, images: np.ndarray, frames: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """uint8 crops, images (B, S, S, 3) and frames (B, n, s, s, 3) -> P(fake) (B,) and maps."""
        if self.cfg.variant == "xception":
            frames = None
        n = len(images)
        if self.compiled and n < self.batch_size:  # one shape for the compiled graph
            images = _pad(images, self.batch_size)
            frames = None if frames is None else _pad(frames, self.batch_size)
        autocast = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            logits, maps = self.forward(self._to_input(images), None if frames is None else self._to_input(frames))
        probs = torch.softmax(logits[:n].float(), dim=1)[:, 1].cpu().numpy()
        return probs, {k: v[:n].float().cpu().numpy() for k, v in maps.items()}

    def score_batch(self, images: np.ndarray, frames: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``score`` over a batch: on CPU in steps of CPU_STEP clips (unless compiled: one graph,
        whole batches), elsewhere at once."""
        if self.device.type != "cpu" or self.compiled or len(images) <= CPU_STEP:
            return self.score(images, frames)
        parts = [self.score(images[k:k + CPU_STEP], None if frames is None else frames[k:k + CPU_STEP])
                 for k in range(0, len(images), CPU_STEP)]
        return np.concatenate([p for p, _ in parts]), {key: np.concatenate([m[key] for _, m in parts])
                                                        for key in parts[0][1]}

    def __call__(self, clips: list[faces_mod.FaceClip]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.score_batch(np.stack([c.image for c in clips]), np.stack([c.frames for c in clips]))

    def replica(self, device: torch.device) -> "Runner":
        """The same model on another device (one per GPU)."""
        model = copy.deepcopy(self.model).to(device)
        return Runner(model, device, self.dtype, use_compile=self.compiled, batch_size=self.batch_size, say=self.say)


def make_runner(model: LDADetector, device: torch.device, dtype: torch.dtype, backend: str = "torch", *,
                key: str = "", batch_size: int = 8, use_compile: bool = False, say=None):
    """The model runner of ``backend`` (``openvino_backend.pick_backend``'s answer): a torch
    ``Runner``, or an ``OpenVinoRunner`` converted from the model (cached under ``key``, the
    checkpoint's sha256)."""
    if backend == "openvino":
        from .openvino_backend import OpenVinoRunner

        if use_compile:
            raise ConfigError("--compile is torch.compile: it does not apply to --backend openvino")
        return OpenVinoRunner(model, dtype, key=key, batch_size=batch_size, say=say)
    return Runner(model, device, dtype, use_compile=use_compile, batch_size=batch_size, say=say)


def _pad(batch, size: int):
    if isinstance(batch, torch.Tensor):  # crops cut on the device
        return torch.cat([batch, batch.new_zeros((size - len(batch), *batch.shape[1:]))])
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


# ---------------------------------------------------------------------------- results
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
    head: dict = field(default_factory=dict)
    tail: dict | None = None  # set when preparation ended
    error: str | None = None
    tracks: dict[int, list[FrameScore]] = field(default_factory=dict)
    left: int = 0  # face clips sent and not yet scored
    model_s: float = 0.0
    top: list = field(default_factory=list)  # heap of (score, seq, FrameScore) kept for heatmaps
    face_clips: int = 0  # counted here when the device prepares (the workers only decode)
    device_s: float = 0.0  # its share of device preparation steps


def _video_with_frames(video: dict | None, frames: int | None) -> dict | None:
    """The record's ``video``, with ``frames`` the length the sampling used (decoding may have
    found the header's estimate wrong and counted again)."""
    if video is None or not frames:
        return video
    return {**video, "frames": frames}


def aggregate(scores: list[float], how: str) -> float:
    if how == "median":
        return float(np.median(scores))
    if how == "max":
        return float(np.max(scores))
    return float(np.mean(scores))


# A face must be confirmed before it counts: seen in two clips or more, or, seen once, with a
# detector score this sure. BlazeFace on the real faces here (carphone 176x144, the astronaut, two
# faces; every sampled clip searched in full) scored 0.665-0.97; its false faces, on skimage's
# photos blurred (letters, coins, a cat), 0.52-0.62 (README "What confirms a face"). dlib's HOG
# margins are another scale and were not measured: every dlib sighting counts, as before.
CONFIRM_SINGLE = {"blazeface": 0.65, "scrfd": 0.65}


def confirmed(frames: list["FrameScore"], single: float) -> bool:
    """A track counts when it was seen in more than one clip, or once with a score >= ``single``."""
    return len(frames) > 1 or any(f.det_score >= single for f in frames)


def model_record(info: CheckpointInfo, checkpoint_sha: str, backend: str = "torch") -> dict:
    """What every record says of the model: its name (the published model's, else the file's
    stem), variant, checkpoint file and sha256, licence (the checkpoint's, null when it states
    none), whether it is untrained, and the runtime."""
    return {"name": info.name, "variant": info.variant, "checkpoint": Path(info.path).name, "sha256": checkpoint_sha,
            "license": info.license, "untrained": info.untrained, "backend": backend}


def error_record(path: str, error: str, *, settings: ScanSettings, model: dict, detector: str) -> dict:
    """The record of an input that never reached preparation (e.g. a folder without videos)."""
    return {"schema": SCHEMA, "path": path, "sha256": None, "file": None, "verdict": "error", "score": None,
            "threshold": settings.threshold, "aggregation": settings.aggregation, "error": error, "model": model,
            "detector": detector, "settings": settings.record(), "video": None, "sampling": {}, "tracks": [],
            "warnings": [], "timings": {}, "heatmaps": None}


def exit_code(verdicts: Counter | Iterable[str]) -> int:
    """Antivirus convention: 1 if anything is fake, else 2 if anything failed, else 0."""
    counts = verdicts if isinstance(verdicts, Counter) else Counter(verdicts)
    if counts.get("fake"):
        return 1
    if counts.get("error"):
        return 2
    return 0


# ---------------------------------------------------------------------------- scoring threads
@dataclass
class _Batch:
    entries: list  # (index, ClipMeta) per clip
    images: np.ndarray
    frames: np.ndarray
    run: int = 0  # the run it belongs to: results of an ended run are dropped


# A part-filled batch leaves once its oldest clip has waited this long (or at once when a model
# lane is idle, or when no more clips can come): a dynamic batcher's deadline, which needs no
# knowledge of how the clips are produced.
BATCH_WAIT_S = 0.25


MAX_CPU_LANES = 8  # each lane holds a step's activations (~120 MB a clip at full size, fp32)
# A CPU lane scores its batch one clip at a time: as fast as larger steps on one thread (model
# alone, 2 lanes, clips/s at steps of 1/2/4/8: 4.83-5.25 / 4.73-4.99 / 4.68-4.79 / 4.53-4.55), and
# the activations of two lanes peak at +250 MB instead of +457 MB (steps of 2) or +1336 MB (8).
CPU_STEP = 1


def cpu_lanes(threads: int) -> list[int]:
    """The threads of each model lane on CPU, for ``threads`` threads in all: one thread per lane,
    up to MAX_CPU_LANES lanes (more threads are spread over them).

    Why lanes: convolutions on a few threads meet at a barrier in every parallel region, so one
    model on 2 threads ran at 3.05-3.1 clips/s on this 2-core machine where two models of one
    thread each, side by side, ran at 3.8-4.0 (benchmarks/folder_ratio.py, README 'Performance').
    Single-threaded lanes also share cores with busy preparation without stalling: a scan of 4
    720p videos took 37-39 s with two lanes, 49-50 s with one two-thread model that stepped down
    to one thread while preparation worked (the scheme this replaced). More than 8 lanes would
    cost memory for little gain (unmeasured: only 2 cores here)."""
    threads = max(1, threads)
    lanes = min(threads, MAX_CPU_LANES)
    return [threads // lanes + (1 if i < threads % lanes else 0) for i in range(lanes)]


class _Scorer(threading.Thread):
    """One model lane: a runner and a thread scoring batches from the shared queue. A GPU has
    one; the CPU has one per ``cpu_lanes`` entry, all on the same runner (inference is
    stateless, so lanes share one set of weights), each with its own thread count."""

    def __init__(self, runner: Runner, jobs: queue.Queue, results: queue.Queue, wake: Callable[[], None],
                 threads: int = 0, lane: int = 0):
        super().__init__(name=f"deepscan-score-{runner.device}-{lane}", daemon=True)
        self.runner, self.jobs, self.results, self.wake, self.threads = runner, jobs, results, wake, threads
        self.working = False

    def run(self) -> None:
        r = self.runner
        if r.device.type == "cpu":
            torch.set_num_threads(self.threads or r.threads)  # a new thread starts with the default
        elif r.device.type == "cuda":
            torch.cuda.set_device(r.device)
        while (batch := self.jobs.get()) is not None:
            self.working = True
            t = time.perf_counter()
            try:
                probs, maps = r.score_batch(batch.images, batch.frames)
                if r.device.type == "cpu":
                    release_free_memory()
                self.results.put((batch, probs, maps, time.perf_counter() - t))
            except BaseException as exc:  # noqa: BLE001 - handed to the scanning thread, which stops
                self.results.put((batch, exc, None, 0.0))
            finally:
                self.working = False
                self.wake()


def model_lanes(runners: list[Runner]) -> list[tuple[Runner, int]]:
    """(runner, CPU threads) of each model lane: one per GPU runner, ``cpu_lanes`` per CPU runner."""
    return [(r, t) for r in runners for t in (cpu_lanes(r.threads) if r.device.type == "cpu" else [0])]


def _lane_scorers(runners: list[Runner], jobs: queue.Queue, results: queue.Queue,
                  wake: Callable[[], None]) -> list[_Scorer]:
    return [_Scorer(r, jobs, results, wake, threads, k) for k, (r, threads) in enumerate(model_lanes(runners))]


def score_in_lanes(runners: list[Runner], batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Score ``batches`` of (images, frames) through the very lanes a Scanner runs, and wait (the
    model alone at a scan's settings, for benchmarks); the first failure is raised."""
    jobs: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    scorers = _lane_scorers(runners, jobs, results, lambda: None)
    for images, frames in batches:
        jobs.put(_Batch([], images, frames))
    for s in scorers:
        jobs.put(None)
        s.start()
    for s in scorers:
        s.join()
    while not results.empty():
        failure = results.get_nowait()[1]
        if isinstance(failure, BaseException):
            raise failure


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Hand the pages of freed memory back to the system (glibc's malloc_trim). After a CPU model
    step the heap holds ~100 MB of freed activations, scattered; left alone, the peak RSS of a
    scan wandered by +-50 MB between identical runs and was ~150 MB higher (measured on 16 videos:
    1294-1345 MB without, 1177 MB in three of three runs with; ~7 ms a call, ~1 % of a step)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Waker:
    """A pipe the scorer threads write a byte to, so the scanning thread wakes from its wait.
    Closed under a lock: a slow lane that finishes after the scan never writes into a closed
    descriptor (whose number may belong to another file by then)."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.w, False)
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self.r

    def __call__(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self.w, b"x")
            except (BlockingIOError, OSError):
                pass  # already awake (pipe full)

    def clear(self) -> None:
        try:
            os.set_blocking(self.r, False)
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.r, self.w):
                try:
                    os.close(fd)
                except OSError:
                    pass


# ---------------------------------------------------------------------------- the scanner
def slots_for(settings: ScanSettings, workers: int, gpu: bool, devices: int = 1) -> int:
    """Slots per worker: enough in all for two batches per device; on CPU a deep buffer, so that
    a worker works ahead while the slower model catches up."""
    if settings.preparation == "device":  # a slot holds a decoded clip, not a face clip
        return DEVICE_SLOTS
    per = -(-2 * settings.batch_size * devices // max(1, workers))
    return max(16, per) if gpu else max(64, per)


def start_pool(settings: ScanSettings, cfg, make_detector, workers: int, *, devices: int = 1, gpu: bool = False,
               slots_per_worker: int = 0, max_side: int | None = None) -> PreparePool:
    """Preparation workers for scans with ``settings`` and a model of config ``cfg``."""
    if not slots_per_worker:
        slots_per_worker = slots_for(settings, workers, gpu, devices)
    return PreparePool(workers, settings.prep(cfg, max_side), make_detector, slots_per_worker=slots_per_worker,
                       stall_s=settings.timeout_s)


def pin_slots(pool: PreparePool):
    """Page-lock the pool's shared slots for CUDA (cudaHostRegister), so that decoded frames go
    from a slot to the GPU by DMA rather than through a pageable staging copy; returns the undo,
    or None where CUDA declines (then copies are pageable, and slower)."""
    if pool.threaded or not hasattr(torch._C, "_cudart"):
        return None
    try:
        buf = np.frombuffer(pool.block.buf, np.uint8)  # an export: the mapping stays while it lives
        ptr, size = buf.ctypes.data, buf.nbytes
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(ptr, size, 0)) != 0:
            return None
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return None

    def undo() -> None:
        cudart.cudaHostUnregister(ptr)

    undo.export = buf  # held while pinned: the mapping cannot be closed under the registration
    return undo


class Scanner:
    """The local pipeline: ``workers`` preparation processes (0: one thread), one scorer per
    runner (device), assembly. Reusable: ``run`` may be called several times (a Ray actor does).

    ``make_detector`` is a picklable zero-argument callable returning a face detector (see
    ``faces.DetectorSpec``); ``detector_name`` goes into every record. With ``heatmaps`` set,
    each video's PNGs are written when it completes, before its record is emitted. ``pool``: workers
    started earlier with ``start_pool`` (the CLI starts them while the model loads)."""

    def __init__(self, runners: list[Runner], make_detector, detector_name: str, settings: ScanSettings, *,
                 workers: int = 0, model: dict | None = None, heatmaps: Path | None = None,
                 slots_per_worker: int = 0, say: Callable[[str], None] | None = None, max_side: int | None = None,
                 pool: PreparePool | None = None, nvdec_module=None):
        if not runners:
            raise ConfigError("no device to score on")
        self.runners, self.settings, self.say = runners, settings, say
        self.detector_name, self.model = detector_name, model or {}
        self.heatmaps = heatmaps
        self.cfg = runners[0].cfg
        self.batch_size = settings.batch_size
        self.gpu = any(r.device.type == "cuda" for r in runners)
        self.pool = pool or start_pool(settings, self.cfg, make_detector, workers, devices=len(runners), gpu=self.gpu,
                                       slots_per_worker=slots_per_worker, max_side=max_side)
        self.window = max(16, 4 * len(self.pool.workers))  # inputs in flight beyond the next to emit
        self.device_prep = None
        if settings.preparation == "device":
            from .device_prep import DevicePreparer

            self.device_prep = DevicePreparer(runners[0].device, image_size=self.cfg.image_size,
                                              lda_size=self.cfg.lda_size, margin=settings.margin,
                                              min_face=settings.min_face)
        self._pinned = pin_slots(self.pool) if self.device_prep is not None and self.gpu else None
        if settings.decoder == "nvdec":
            from .nvdec import NvdecPool

            self.pool = NvdecPool(self.pool, settings.prep(self.cfg, max_side), runners[0].device, module=nvdec_module,
                                  say=say, stall_s=settings.timeout_s)
        self._waker = _Waker()
        self._results: queue.Queue = queue.Queue()
        self._jobs: queue.Queue = queue.Queue(maxsize=2 * len(model_lanes(runners)))
        self._scorers = _lane_scorers(runners, self._jobs, self._results, self._waker)
        for s in self._scorers:
            s.start()
        self._closed = False

    # ---- lifecycle
    def close(self, timeout: float = 10.0) -> bool:
        """Stop workers and scorers; True if every thread ended (a batch in progress is waited for)."""
        if self._closed:
            return True
        self._closed = True
        if self._pinned is not None:
            self._pinned()  # unpinned before the slots are unmapped
        self.pool.close()
        while True:  # drop batches not started
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self._scorers:
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                pass
        deadline = time.monotonic() + timeout
        for s in self._scorers:
            s.join(max(0.0, deadline - time.monotonic()))
        self._waker.close()
        return not any(s.is_alive() for s in self._scorers)

    def __enter__(self) -> "Scanner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one run
    def run(self, inputs: Iterable[ScanInput], on_record: Callable[[dict, Row], None]) -> Counter:
        """Scan ``inputs`` (any iterable, consumed lazily), calling ``on_record(record, row)``
        for each in input order. Returns the count of each verdict. On KeyboardInterrupt (or any
        exception) the records already complete are still emitted, in order, before it propagates;
        nothing of a run that failed reaches the next one."""
        with _Run(self, iter(enumerate(inputs)), on_record) as st:
            try:
                self._loop(st)
            finally:
                self._flush_complete(st)
        return st.verdicts

    def _loop(self, st: "_Run") -> None:
        pool = self.pool
        while True:
            self._dispatch(st)
            if st.exhausted and not st.videos and not st.ready:
                return
            if st.raw:
                self._prepare_on_device(st)
            wait = self._form_batches(st)
            if st.raw:  # more decoded clips to prepare: only look for what has come meanwhile
                wait = 0.0
            events, woke = pool.poll(wait if st.videos else 0.5, extra=[self._waker])
            if woke:
                self._waker.clear()
            for ev in events:
                self._on_event(st, ev)
            while True:
                try:
                    item = self._results.get_nowait()
                except queue.Empty:
                    break
                if item[0].run == st.id:  # an ended run's batch: its inputs are gone
                    self._on_scores(st, *item)
            self._emit(st)

    def _dispatch(self, st: "_Run") -> None:
        while not st.exhausted and self.pool.capacity() > 0 and st.next_index < st.next_emit + self.window:
            try:
                index, inp = next(st.inputs)
            except StopIteration:
                st.exhausted = True
                return
            st.next_index = index + 1
            vs = VideoState(index, inp.path, time.perf_counter())
            st.videos[index] = vs
            if inp.error:
                vs.error, vs.tail = inp.error, {}
                self._complete(st, vs)
            else:
                self.pool.submit(index, inp.path)

    def _on_event(self, st: "_Run", ev) -> None:
        kind, index = ev[0], ev[1][1]  # ev[1]: the job, (run, index); the pool passes only this run's
        vs = st.videos.get(index)
        if vs is None:
            if kind in ("clip", "frames"):
                self.pool.free([ev[2]])
            return
        if kind == "start":
            vs.head = ev[2]
        elif kind == "clip":
            vs.left += 1
            st.pending.append(_Pending(index, ev[2], ev[3], time.monotonic()))
        elif kind == "frames":  # a decoded clip for the device to prepare: counted as one clip until then
            vs.left += 1
            pixels = ev[4] if len(ev) > 4 else None  # NVDEC's frames come on the device, in no slot
            st.raw.setdefault(index, []).append(_Pending(index, ev[2], ev[3], time.monotonic(), pixels))
        elif kind == "done":
            vs.tail = ev[2]
            vs.error = vs.tail.get("error")
            if vs.error:
                self._drop_pending(st, index)
            self._maybe_complete(st, vs)
        elif kind == "lost":
            vs.error, vs.tail = ev[2], {"warnings": [], "sampling": {}, "timings": {}}
            self._drop_pending(st, index)
            self._maybe_complete(st, vs)

    def _drop_pending(self, st: "_Run", index: int) -> None:
        keep, drop = [], []
        for p in st.pending:
            (drop if p.index == index else keep).append(p)
        drop += st.raw.pop(index, [])
        if drop:
            st.pending = keep
            st.videos[index].left -= len(drop)
            self.pool.free([p.slot for p in drop if p.slot != -1])

    def _prepare_on_device(self, st: "_Run") -> None:
        """One step of device preparation: the next decoded clip of every video that has one,
        detected, tracked and cropped together (``device_prep``); their face clips join the
        pending ones with their pixels, and the slots go back to the workers."""
        from .device_prep import RawClip, timed_step
        from .workers import ClipMeta

        dev = self.device_prep.device
        firsts = [queue_[0] for queue_ in st.raw.values()]
        raws = []
        for p in firsts:
            if p.pixels is not None:  # decoded by NVDEC, on the device already
                raws.append(RawClip(p.index, p.meta.clip_index, p.meta.frame_indices, p.meta.times, p.pixels))
                continue
            frames = torch.from_numpy(self.pool.view(p.slot, p.meta.shape))
            raws.append(RawClip(p.index, p.meta.clip_index, p.meta.frame_indices, p.meta.times,
                                frames.to(dev, non_blocking=True) if dev.type != "cpu" else frames))
        try:
            prepared, seconds = timed_step(self.device_prep, raws)
        except Exception as exc:  # noqa: BLE001 - the device (e.g. out of memory) fails the scan, loudly
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise DeepscanError(f"device preparation failed on {dev} ({type(exc).__name__}: {first}); "
                                "try --preparation workers") from exc
        finally:
            for p in firsts:  # the crops are new tensors: the slots can go back
                queue_ = st.raw[p.index]
                queue_.pop(0)
                if not queue_:
                    del st.raw[p.index]
            self.pool.free([p.slot for p in firsts])
        share = seconds / max(1, len(firsts))
        now = time.monotonic()
        for p, face_clips in zip(firsts, prepared):
            vs = st.videos[p.index]
            vs.left += len(face_clips) - 1
            vs.face_clips += len(face_clips)
            vs.device_s += share
            for fc in face_clips:
                meta = ClipMeta(fc.track_id, fc.clip_index, fc.frame_index, fc.time_s, fc.box, fc.det_score)
                st.pending.append(_Pending(p.index, -1, meta, now, (fc.image, fc.frames)))
            self._maybe_complete(st, vs)

    def _form_batches(self, st: "_Run") -> float:
        """Send batches to the model lanes: full ones, and a part-filled one when a lane is idle,
        when its oldest clip has waited BATCH_WAIT_S, or when no more clips can come. Returns how
        long the caller may wait before the next part-filled batch is due."""
        b = self.batch_size
        while st.pending and not self._jobs.full():
            if len(st.pending) < b:
                waited = time.monotonic() - st.pending[0].arrival
                idle = self._jobs.empty() and any(not s.working for s in self._scorers)
                if not (idle or waited >= BATCH_WAIT_S or (self.pool.outstanding(st.id) == 0 and not st.raw)):
                    return min(0.2, max(0.0, BATCH_WAIT_S - waited))
            chunk, st.pending = st.pending[:b], st.pending[b:]
            if chunk[0].pixels is not None:  # cut on the device: stacked there (numpy views on the CPU)
                images = torch.stack([p.pixels[0] for p in chunk])
                frames = torch.stack([p.pixels[1] for p in chunk])
                if images.device.type == "cpu":
                    images, frames = images.numpy(), frames.numpy()
            else:
                views = [self.pool.view(p.slot) for p in chunk]
                images = np.stack([v[0] for v in views])
                frames = np.stack([v[1] for v in views])
                self.pool.free([p.slot for p in chunk])
            self._jobs.put(_Batch([(p.index, p.meta) for p in chunk], images, frames, st.id))
        return 0.2

    def _on_scores(self, st: "_Run", batch: _Batch, probs, maps, seconds: float) -> None:
        if isinstance(probs, BaseException):
            exc = probs
            raise DeepscanError(f"the model failed on {len(batch.entries)} face clip(s) "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        share = seconds / max(1, len(batch.entries))
        keep = self.settings.keep_crops if self.heatmaps is not None else 0
        touched = set()
        for j, (index, meta) in enumerate(batch.entries):
            vs = st.videos.get(index)
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
            if keep:
                st.seq += 1
                item = (fs.score, st.seq, fs)
                if len(vs.top) < keep:
                    heapq.heappush(vs.top, item)
                elif fs.score > vs.top[0][0]:
                    heapq.heapreplace(vs.top, item)
                else:
                    continue
                crop = batch.frames[j, 0]
                fs.crop = crop.cpu().numpy() if isinstance(crop, torch.Tensor) else crop.copy()
                fs.maps = {k: v[j].copy() for k, v in maps.items()}
        for index in touched:
            self._maybe_complete(st, st.videos[index])

    def _maybe_complete(self, st: "_Run", vs: VideoState) -> None:
        if vs.tail is not None and vs.left == 0:
            self._complete(st, vs)

    def _complete(self, st: "_Run", vs: VideoState) -> None:
        """Turn a finished video into its record and row; drop everything per frame."""
        del st.videos[vs.index]
        if self.device_prep is not None:
            self.device_prep.forget(vs.index)
        record, row = self._record(vs)
        st.ready[vs.index] = (record, row)
        st.verdicts[record["verdict"]] += 1

    def _record(self, vs: VideoState) -> tuple[dict, Row]:
        s = self.settings
        tail = vs.tail or {}
        warnings = list(tail.get("warnings", []))
        score, verdict, track_scores, unconfirmed = None, "error", {}, []
        if vs.error is None:
            sure = CONFIRM_SINGLE.get(self.detector_name, 0.0)
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
            from .heatmaps import write_heatmaps

            doubtful = {id(f) for tid in unconfirmed for f in vs.tracks[tid]}
            frames = [f for _, _, f in sorted(vs.top, key=lambda t: (-t[0], t[1])) if id(f) not in doubtful]
            try:
                timeline = ({tid: [(f.time_s, f.score) for f in fr] for tid, fr in vs.tracks.items()
                             if tid in track_scores}, s.threshold)
                folder = write_heatmaps(vs.path, verdict, score, frames, self.heatmaps, timeline) if frames else None
            except (OSError, ValueError) as exc:
                warnings.append(f"heatmaps not written ({io_reason(exc)})")
        vs.top = []
        box_scale = vs.head.get("box_scale", 1.0)
        timings = dict(tail.get("timings", {}))
        sampling = tail.get("sampling", {})
        if self.device_prep is not None and sampling:  # the workers only decoded: faces were counted here
            sampling = {**sampling, "face_clips": vs.face_clips}
            timings["detect_crop_s"] = vs.device_s
        timings["model_s"] = vs.model_s
        timings["total_s"] = time.perf_counter() - vs.t0
        record = {
            "schema": SCHEMA,
            "path": vs.path,
            "sha256": vs.head.get("sha256"),
            "file": vs.head.get("file"),
            "verdict": verdict,
            "score": None if score is None else round(score, 6),
            "threshold": s.threshold,
            "aggregation": s.aggregation,
            "error": vs.error,
            "model": self.model,
            "detector": self.detector_name,
            "settings": s.record(),
            "video": _video_with_frames(vs.head.get("video"), tail.get("video_frames")),
            "sampling": sampling,
            "tracks": [
                {"id": tid, "score": round(track_scores[tid], 6),
                 "frames": [{"index": f.index, "time_s": f.time_s, "score": round(f.score, 6),
                             "box": [round(v * box_scale, 1) for v in f.box]}
                            for f in sorted(frames, key=lambda f: f.index)]}  # in time order, whichever lane was first
                # an error keeps no tracks, even when clips of it were scored before its worker died
                # (those have no track score: taking one crashed the scan, found by killing workers)
                for tid, frames in sorted(vs.tracks.items()) if tid in track_scores
            ],
            "unconfirmed": [
                {"id": tid, "frames": [{"index": f.index, "time_s": f.time_s, "detector_score": round(f.det_score, 4),
                                        "box": [round(v * box_scale, 1) for v in f.box]} for f in vs.tracks[tid]]}
                for tid in unconfirmed
            ],
            "warnings": warnings,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "heatmaps": folder,
        }
        error = vs.error
        if error and error.startswith(vs.path + ": "):
            error = error[len(vs.path) + 2:]
        note = error or "; ".join(warnings) or (folder and f"heatmaps: {folder}") or ""
        row = Row(vs.path, verdict, score, len(track_scores), sum(len(vs.tracks[t]) for t in track_scores),
                  round(timings["total_s"], 2), note)
        return record, row

    def _emit(self, st: "_Run") -> None:
        while st.next_emit in st.ready:
            record, row = st.ready.pop(st.next_emit)
            st.next_emit += 1
            st.on_record(record, row)

    def _flush_complete(self, st: "_Run") -> None:
        """After an interruption: emit every complete record still waiting, in input order."""
        for index in sorted(st.ready):
            record, row = st.ready.pop(index)
            st.on_record(record, row)


class _Pending(NamedTuple):
    """A face clip waiting in its slot for a batch (or a decoded clip waiting for the device)."""

    index: int  # the input's
    slot: int  # -1: the pixels are here, cut on the device; < -1: an NVDEC thread's token (nvdec.NvdecPool)
    meta: object  # workers.ClipMeta (workers.FramesMeta for a decoded clip)
    arrival: float  # time.monotonic() when it arrived: the batching deadline counts from the oldest
    pixels: object = None  # (image, frames) tensors cut on the device; a decoded clip's frames from NVDEC


class _Run:
    """One run of a Scanner: the state of its inputs in flight, with an id stamped on every job
    and batch. Leaving it (normally or on an error) gives back what it holds: the slots of its
    pending clips, its jobs in the workers (cancelled), its batches not yet started. Results of
    its batches that are being scored carry its id, and the next run drops them."""

    def __init__(self, scanner: "Scanner", inputs, on_record: Callable[[dict, Row], None]):
        self.scanner, self.inputs, self.on_record = scanner, inputs, on_record
        self.exhausted = False
        self.next_index = self.next_emit = self.seq = 0
        self.videos: dict = {}  # index -> VideoState in flight
        self.ready: dict = {}  # index -> (record, row) waiting for earlier ones
        self.pending: list[_Pending] = []  # clips not yet batched, in arrival order
        self.raw: dict = {}  # index -> [_Pending] decoded clips waiting for the device, in order
        self.verdicts: Counter = Counter()
        self.id = 0

    def __enter__(self) -> "_Run":
        self.id = self.scanner.pool.begin_run()
        return self

    def __exit__(self, *exc) -> None:
        sc = self.scanner
        try:
            sc.pool.free([p.slot for p in self.pending if p.slot != -1]
                         + [p.slot for queue_ in self.raw.values() for p in queue_])
            self.pending, self.raw = [], {}
            if sc.device_prep is not None:
                sc.device_prep.trackers.clear()
            sc.pool.end_run(self.id)
        finally:
            while True:  # batches of this run not yet started
                try:
                    batch = sc._jobs.get_nowait()
                except queue.Empty:
                    break
                if batch is None:  # a stop request (close): keep it
                    sc._jobs.put_nowait(None)
                    break


def scan(inputs: Iterable[ScanInput | tuple[str, str | None]], runner: Runner | list[Runner], detector,
         settings: ScanSettings, on_record: Callable[[dict, Row], None] | None = None, *, workers: int = 0,
         **kw) -> list[dict]:
    """Scan and return every record (small scans, tests, benchmarks; the CLI streams with ``Scanner``).

    ``detector`` is a ``faces.DetectorSpec`` (or any picklable object with ``build()`` and
    ``name``); with ``workers=0`` it may also be a detector object, used as it is."""
    if hasattr(detector, "build"):
        factory = detector.build
    elif workers == 0:
        factory = functools.partial(_same, detector)
    else:
        raise ValueError("worker processes need a picklable detector spec with build(), e.g. faces.DetectorSpec")
    runners = runner if isinstance(runner, list) else [runner]
    items = (i if isinstance(i, ScanInput) else ScanInput(i[0], i[0], i[1]) for i in inputs)
    out: list[dict] = []

    def collect(record, row):
        out.append(record)
        if on_record:
            on_record(record, row)

    with Scanner(runners, factory, detector.name, settings, workers=workers, **kw) as scanner:
        scanner.run(items, collect)
    return out


def _same(obj):
    return obj
