"""The prepare stage of a scan, in worker processes: decode, detect, track and crop whole videos.

Each worker takes whole videos (at most two at a time: the one it works on and the next) and
hands every face clip to the scanning process through a slot of one shared-memory block: the
worker writes the crops into its own slot and sends only the slot number and a small metadata
tuple through its pipe. The scanning process copies the slot into a model batch and gives the
slot back. Nothing per clip is pickled, and memory is bounded by workers x slots, never by the
number of inputs. A worker that has used all its slots rests until three quarters are free
again, so it works in bursts of whole batches rather than clip by clip.

Workers never import torch (a CUDA build costs ~0.5 GB per process): numpy, Pillow, dlib or
onnxruntime (CPU provider, one thread), ffmpeg in subprocesses. They start from a fork server
preloaded with this module, so a replacement starts in milliseconds.

Why this is written by hand: no library offers what a scan needs at once. A torch DataLoader
(and concurrent.futures) breaks as a whole when one worker dies; pebble isolates crashes and
timeouts per task but returns one pickled result per task when it ends (no streaming of clips,
every pixel pickled). Here a worker that dies or stalls costs exactly the input it held (it
becomes an ``error`` record), a replacement takes over its slots and its queued inputs, and the
scan goes on.

With ``workers=0`` the same worker loop runs in a thread of the scanning process (for
debugging, tests with in-process detectors, and machines where processes are unwelcome).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import connection, shared_memory
from typing import Callable, Iterator

import numpy as np

from . import faces as faces_mod
from .config import CROP_MARGIN
from .errors import DeepscanError, MediaError
from .hashing import sha256_file
from .video import MAX_SIDE, DecodeReport, check_readable, plan_clips, probe, sample_clips

JOBS_PER_WORKER = 2  # the input being prepared and the next one, so a worker never waits for the driver
REST_FRACTION = 0.75  # a worker out of slots rests until this fraction of them is free again
DEEP_EVERY = 8  # the expensive small-face search runs on the first clip and every 8th (see faces.DlibDetector)
FULL_EVERY = 4  # between whole-frame searches, faces being followed are looked for around where they were


@dataclass(frozen=True)
class PrepSettings:
    """Everything a worker needs to prepare a video (frozen and picklable)."""

    clips: int = 32  # K clips per video (SPEC §2)
    clip_len: int = 3  # n consecutive frames per clip (the model's)
    image_size: int = 398  # backbone crop (the model's)
    lda_size: int = 224  # LDA crop (the model's)
    margin: float = CROP_MARGIN
    min_face: int = faces_mod.MIN_FACE
    strategy: str = "auto"  # decoding: auto | select | seek
    hash_files: bool = True
    max_side: int = MAX_SIDE  # frames larger than this are scaled down in ffmpeg

    @property
    def slot_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.image_size, self.image_size, 3), (self.clip_len, self.lda_size, self.lda_size, 3)

    @property
    def slot_bytes(self) -> int:
        a, b = self.slot_shapes
        return math.prod(a) + math.prod(b)


# ---------------------------------------------------------------------------- one video
@dataclass
class ClipMeta:
    """A face clip without its pixels: what the scanning process needs besides the slot."""

    track_id: int
    clip_index: int
    frame_index: int  # the frame the model classifies (the clip's first)
    time_s: float
    box: tuple[float, float, float, float]  # detector box in decoded-frame pixels


def prepare_video(index: int, path: str, detector, settings: PrepSettings) -> Iterator:
    """Decode, detect, track and crop one video, yielding its events in order:
    ``("start", index, head)``, then one ``FaceClip`` per face and sampled clip, then
    ``("done", index, tail)``. A failure becomes ``tail["error"]``; it is never raised."""
    head: dict = {"sha256": None, "video": None, "file": None, "box_scale": 1.0}
    tail: dict = {"error": None, "sampling": {}, "warnings": [], "timings": {}, "face_clips": 0}
    started = False
    try:
        p = check_readable(path)
        st = p.stat()
        head["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if settings.hash_files:
            head["sha256"] = sha256_file(path)
        info = probe(path, settings.max_side)
        head["box_scale"] = info.source_width / info.width
        head["video"] = {"width": info.source_width, "height": info.source_height, "fps": round(info.fps, 3),
                         "duration_s": round(info.duration, 3), "frames": info.num_frames, "rotation": info.rotation,
                         "codec": info.codec, "stream": info.stream, "sar": round(info.sar, 4)}
        yield "start", index, head
        started = True
        clip_len = settings.clip_len
        if (info.num_frames or info.frames_exact) and not plan_clips(info.num_frames, settings.clips, clip_len):
            raise MediaError(f"{path}: only {info.num_frames} frame(s), fewer than the {clip_len} "
                             f"consecutive frames the model needs; use a longer video")
        report = DecodeReport()
        tracker = faces_mod.Tracker()
        timings = tail["timings"]
        timings.update(decode_s=0.0, detect_crop_s=0.0)
        count = 0
        t = time.perf_counter()
        for clip in sample_clips(info, settings.clips, clip_len, settings.strategy, report):
            t1 = time.perf_counter()
            timings["decode_s"] += t1 - t
            dets = faces_mod.filter_faces(detector(clip.frames[0], hints=tracker.recent(), follow=tracker.active(),
                                                   min_face=settings.min_face, deep=clip.index % DEEP_EVERY == 0,
                                                   full=clip.index % FULL_EVERY == 0), settings.min_face)
            ids = tracker.assign(dets)
            fcs = faces_mod.face_clips(path, clip, dets, ids, settings.image_size, settings.lda_size, settings.margin)
            t = time.perf_counter()
            timings["detect_crop_s"] += t - t1
            for fc in fcs:
                count += 1
                yield fc
            t = time.perf_counter()
        tail["face_clips"] = count
        tail["sampling"] = {"clips": report.planned, "n": clip_len, "decoded_clips": report.decoded,
                            "frames": report.decoded * clip_len, "face_clips": count, "strategy": report.strategy}
        tail["warnings"] += report.warnings
        if report.warning:
            tail["warnings"].append(report.warning)
        if report.decoded == 0:
            raise MediaError(f"{path}: no clip of {clip_len} consecutive frames could be decoded; "
                             "the file is damaged, truncated or too short")
    except DeepscanError as exc:
        tail["error"] = str(exc)
    except Exception as exc:  # an unexpected failure must not stop the other inputs
        if os.environ.get("DEEPSCAN_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        tail["error"] = f"{path}: unexpected {type(exc).__name__}: {exc}"
    if not started:
        yield "start", index, head
    yield "done", index, tail


# ---------------------------------------------------------------------------- the worker loop
class _Stop(Exception):
    pass


def _worker_loop(conn, slots: list[int], slot_view: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 make_detector, settings: PrepSettings) -> None:
    """Serve jobs from ``conn`` until told to stop or the other end goes away."""
    jobs: deque = deque()
    free: set[int] = set(slots)
    rest_until = max(1, int(len(slots) * REST_FRACTION))
    try:
        detector = make_detector()
    except Exception as exc:  # noqa: BLE001 - reported to the scanning process, which stops
        conn.send(("fatal", f"the face detector could not be set up in a preparation worker "
                            f"({type(exc).__name__}: {exc})"))
        conn.close()
        return

    def pump(block: bool) -> None:
        while block or conn.poll():
            block = False
            msg = conn.recv()
            if msg[0] == "job":
                jobs.append(msg[1:])
            elif msg[0] == "free":
                free.update(msg[1])
            elif msg[0] == "stop":
                raise _Stop

    try:
        while True:
            if not jobs:
                pump(block=True)
                continue
            index, path = jobs.popleft()
            for ev in prepare_video(index, path, detector, settings):
                if isinstance(ev, tuple):
                    conn.send(ev)
                else:
                    if not free:  # out of slots: rest until most are back (bursts, see module doc)
                        while len(free) < rest_until:
                            pump(block=True)
                    slot = free.pop()
                    image, frames = slot_view(slot)
                    image[...] = ev.image
                    frames[...] = ev.frames
                    conn.send(("clip", index, slot, ClipMeta(ev.track_id, ev.clip_index, ev.frame_indices[0],
                                                             ev.times[0], ev.box)))
                pump(block=False)
    except (_Stop, EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        pass
    finally:
        conn.close()  # the other end sees EOF (a thread does not close it by ending)


def _slot_viewer(buf, settings: PrepSettings):
    shape_i, shape_f = settings.slot_shapes
    size_i = math.prod(shape_i)

    def view(slot: int) -> tuple[np.ndarray, np.ndarray]:
        base = slot * settings.slot_bytes
        return (np.ndarray(shape_i, np.uint8, buffer=buf, offset=base),
                np.ndarray(shape_f, np.uint8, buffer=buf, offset=base + size_i))

    return view


def _process_main(conn, shm_name: str, slots: list[int], make_detector, settings: PrepSettings) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scanning process decides when workers stop
    try:
        os.setpgrp()  # ... and Ctrl-C in a terminal reaches neither us nor our ffmpeg processes
    except OSError:
        pass
    # Attaching registers the block with the resource tracker again (Python < 3.13); that tracker
    # is the scanning process's own (shared through the fork server), so the block is still
    # unlinked exactly once: by the scanning process, or by the tracker if that process dies.
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        _worker_loop(conn, slots, _slot_viewer(shm.buf, settings), make_detector, settings)
    finally:
        shm.close()


# ---------------------------------------------------------------------------- the pool
def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_context():
    """A fork server preloaded with this module: clean (no threads, no torch) and quick to fork."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["deepscan.workers"])
        return ctx
    return mp.get_context("spawn")


@contextlib.contextmanager
def _main_module_hidden():
    """Start processes without re-running the parent's main script in them.

    multiprocessing's fork server and spawn re-import the parent's ``__main__`` in each child (so
    that functions defined there can be unpickled). Ours live in importable modules, and the
    parent's main may be anything: a script that imports torch (0.5 GB and seconds per worker),
    or one without an ``if __name__ == "__main__"`` guard (a Ray driver, a notebook), which would
    start scanning again in every worker. So the main module's name and file are hidden while a
    worker starts; what a worker needs must therefore be importable (e.g. ``DetectorSpec.build``)."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__spec__", "__file__") if main is not None and hasattr(main, k)}
    try:
        for k in saved:
            if k == "__spec__":
                main.__spec__ = None
            else:
                delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


@dataclass
class _Worker:
    position: int
    slots: list[int]
    conn: object = None
    proc: object = None  # a Process, or a Thread with workers=0
    jobs: deque = field(default_factory=deque)  # (index, path) sent and not yet done, in order
    out: set = field(default_factory=set)  # slots holding clips the scanning process has not freed
    last_progress: float = 0.0
    stalled: bool = False  # killed for making no progress
    events: int = 0  # events received from the current process (0 at death: it died at start)


class PreparePool:
    """Worker processes (or one thread) preparing videos; see the module docstring.

    ``submit`` an input, then read ``poll``'s events: ``("start", i, head)``,
    ``("clip", i, slot, ClipMeta)``, ``("done", i, tail)``, and ``("lost", i, reason)`` when the
    worker holding input i died or stalled (a replacement has taken over by then). ``view(slot)``
    gives a slot's arrays; ``free(slots)`` hands them back once copied."""

    def __init__(self, workers: int, settings: PrepSettings, make_detector, *, slots_per_worker: int = 16,
                 stall_s: float = 600.0, ctx=None):
        self.settings, self.make_detector = settings, make_detector
        self.threaded = workers == 0
        count = max(1, workers)
        self.slots_per_worker, self.stall_s = max(1, slots_per_worker), stall_s
        self.ctx = None if self.threaded else (ctx or default_context())
        total = count * self.slots_per_worker * settings.slot_bytes
        self.shm = shared_memory.SharedMemory(create=True, size=max(1, total))
        self._view = _slot_viewer(self.shm.buf, settings)
        self.workers = [_Worker(p, list(range(p * self.slots_per_worker, (p + 1) * self.slots_per_worker)))
                        for p in range(count)]
        self.replaced = 0
        self.failed_starts = 0
        self._closed = False
        try:
            for w in self.workers:
                self._start(w)
        except BaseException:
            self.close()
            raise

    # ---- lifecycle
    def _start(self, w: _Worker) -> None:
        free = [s for s in w.slots if s not in w.out]
        if self.threaded:
            ours, theirs = mp.Pipe()
            w.proc = threading.Thread(target=_worker_loop, name=f"deepscan-prepare-{w.position}", daemon=True,
                                      args=(theirs, free, self._view, self.make_detector, self.settings))
        else:
            ours, theirs = self.ctx.Pipe()
            w.proc = self.ctx.Process(target=_process_main, name=f"deepscan-prepare-{w.position}", daemon=True,
                                      args=(theirs, self.shm.name, free, self.make_detector, self.settings))
        w.conn, w.events = ours, 0
        if self.threaded:
            w.proc.start()
        else:
            with _main_module_hidden():
                w.proc.start()
        if not self.threaded:
            theirs.close()
        w.last_progress = time.monotonic()
        for job in w.jobs:  # a replacement takes over the inputs queued for its predecessor
            w.conn.send(("job", *job))

    def close(self) -> None:
        """Stop every worker (killing what does not stop at once) and release the shared memory."""
        if self._closed:
            return
        self._closed = True
        try:
            for w in self.workers:
                if w.conn is not None:
                    try:
                        w.conn.send(("stop",))
                    except OSError:
                        pass
            deadline = time.monotonic() + 2.0
            for w in self.workers:
                started = w.proc is not None and (self.threaded or w.proc.pid is not None)
                if started:
                    w.proc.join(max(0.0, deadline - time.monotonic()))
                    if not self.threaded and w.proc.is_alive():
                        self._kill(w)
                        w.proc.join(2.0)
                if w.conn is not None:
                    w.conn.close()
        finally:
            self.shm.close()
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "PreparePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _kill(w: _Worker) -> None:
        """SIGKILL a worker and its ffmpeg processes (its own process group)."""
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except OSError:
            try:
                w.proc.kill()
            except OSError:
                pass

    # ---- work
    def capacity(self) -> int:
        return sum(JOBS_PER_WORKER - len(w.jobs) for w in self.workers)

    def outstanding(self) -> int:
        return sum(len(w.jobs) for w in self.workers)

    def submit(self, index: int, path: str) -> None:
        w = min(self.workers, key=lambda w: len(w.jobs))
        if len(w.jobs) >= JOBS_PER_WORKER:
            raise RuntimeError("no capacity: check capacity() first")
        if not w.jobs:
            w.last_progress = time.monotonic()
        w.jobs.append((index, path))
        w.conn.send(("job", index, path))

    def view(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        return self._view(slot)

    def free(self, slots) -> None:
        by_worker: dict[int, list[int]] = {}
        for s in slots:
            by_worker.setdefault(s // self.slots_per_worker, []).append(s)
        for p, ss in by_worker.items():
            w = self.workers[p]
            w.out.difference_update(ss)
            w.last_progress = time.monotonic()  # a worker that waited for slots has not stalled
            try:
                w.conn.send(("free", ss))
            except OSError:
                pass  # it died; its replacement starts with every slot that is not out

    def starved(self) -> bool:
        """True when no worker can make progress without slots being freed (or has no input)."""
        return all(not w.jobs or len(w.out) >= len(w.slots) for w in self.workers)

    def poll(self, timeout: float | None, extra=()) -> tuple[list, list]:
        """Wait up to ``timeout`` s for worker events or any of ``extra`` (waitable objects);
        returns (events, the ``extra`` objects that are ready)."""
        waitables = {w.conn: w for w in self.workers}
        if not self.threaded:
            waitables.update({w.proc.sentinel: w for w in self.workers})
        ready = connection.wait([*waitables, *extra], timeout)
        events: list = []
        dead: list[_Worker] = []
        for r in ready:
            w = waitables.get(r)
            if w is None:
                continue
            if r is w.conn:
                self._drain(w, events, dead)
            elif w not in dead:
                self._drain(w, events, dead)  # whatever it sent before dying comes first
                if w not in dead:
                    dead.append(w)
        now = time.monotonic()
        for w in self.workers:
            if (w.jobs and not self.threaded and w not in dead and len(w.out) < len(w.slots)
                    and now - w.last_progress > self.stall_s):
                self._kill(w)
                w.proc.join(5.0)
                self._drain(w, events, dead)
                if w not in dead:
                    dead.append(w)
                w.stalled = True
        for w in dead:
            events.extend(self._replace(w))
        return events, [r for r in ready if r in extra]

    def _drain(self, w: _Worker, events: list, dead: list) -> None:
        try:
            while w.conn.poll():
                ev = w.conn.recv()
                w.last_progress = time.monotonic()
                w.events += 1
                if ev[0] == "fatal":
                    raise DeepscanError(ev[1])
                if ev[0] == "clip":
                    w.out.add(ev[2])
                elif ev[0] == "done":
                    if w.jobs and w.jobs[0][0] == ev[1]:
                        w.jobs.popleft()
                events.append(ev)
        except (EOFError, OSError):
            if w not in dead:
                dead.append(w)

    def _replace(self, w: _Worker) -> list:
        """Report the input a dead worker held, and start a replacement on its slots and queue."""
        if self.threaded:
            raise RuntimeError("the preparation thread ended unexpectedly")
        if w.events == 0 and not w.stalled:
            self.failed_starts += 1
            if self.failed_starts >= 3:
                raise DeepscanError("preparation workers keep dying as they start (out of memory, or a broken "
                                    "install of dlib/onnxruntime?); try --workers 0 to see the error")
        w.proc.join(1.0)
        code = w.proc.exitcode
        stalled = getattr(w, "stalled", False)
        w.stalled = False
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        events = []
        if w.jobs:
            index, path = w.jobs.popleft()
            if stalled:
                reason = (f"{path}: no progress for {self.stall_s:.0f} s while preparing it (a pathological or "
                          "blocking file?); skipped; raise --timeout if it is just very long")
            else:
                reason = (f"{path}: the preparation worker died while reading it ({how}; a crash in a decoder "
                          "or detector, or out of memory); skipped")
            events.append(("lost", index, reason))
        try:
            w.conn.close()
        except OSError:
            pass
        self.replaced += 1
        self._start(w)
        return events
