"""The prepare stage of a scan, in worker processes: decode, detect, track and crop whole videos.

Each worker takes whole videos (at most two at a time: the one it works on and the next) and
hands every face clip to the scanning process through a slot of one shared-memory block: the
worker writes the crops into its own slot and sends only the slot number and a small metadata
tuple through its pipe. The scanning process copies the slot into a model batch and gives the
slot back. Nothing per clip is pickled, and memory is bounded by workers x slots, never by the
number of inputs.

One owner for each piece of state (the lesson of a first version, where worker, pool and
scanner each kept part of it and one dead worker could end a scan): the pool in the scanning
process alone knows which jobs each worker holds and which of its slots are out; a worker only
uses the slots granted to it and waits when it has none. Every message to a worker goes through
``PreparePool._send``, which takes a broken pipe for that worker's death. Jobs carry the id of
the run they belong to, so nothing of a failed run reaches the next one.

Nothing outlives the scan: workers ask Linux for SIGKILL when their parent (the fork server,
which ends with the scanning process) dies, and the slots live in an anonymous memfd that the
kernel frees with the last process holding it, however the processes end.

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
import errno
import math
import mmap
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
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .. import faces as faces_mod
from ..config import CROP_MARGIN
from ..errors import DeepscanError, MediaError, show_warnings_escaped
from ..hashing import sha256_file
from ..video import MAX_SIDE, Clip, DecodeReport, check_readable, plan_clips, probe, sample_clips
from .events import ClipMeta, Done, Frames, FramesMeta, Head, Job, Lost, Runs, Slot, Started, Tail, overdue
from .events import Clip as ClipEvent

JOBS_PER_WORKER = 2  # the input being prepared and the next one, so a worker never waits for the driver
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
    # what a worker hands over: "crops" (it detects, tracks and crops) or "frames" (it only decodes;
    # the scanning process prepares on its device, see scan.device)
    handover: str = "crops"
    alignment: str = "none"  # faces.ALIGNMENTS: the checkpoint's (deepfakebench-5pt: on the landmarks)

    @property
    def slot_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.image_size, self.image_size, 3), (self.clip_len, self.lda_size, self.lda_size, 3)

    @property
    def slot_bytes(self) -> int:
        """A slot holds a face clip's two crops, or (handing over frames) a clip's frames of any
        shape up to max_side x max_side: pages are only touched as written (an anonymous memfd),
        so a 720p clip occupies 8.3 MB of its 33 MB slot."""
        if self.handover == "frames":
            return self.clip_len * self.max_side * self.max_side * 3
        a, b = self.slot_shapes
        return math.prod(a) + math.prod(b)


# ---------------------------------------------------------------------------- one video
def describe(path: str, info, hash_file: bool, file: dict | None = None) -> Head:
    """The ``Started`` head of a probed video (its record's ``video``, sha256, box scale)."""
    return Head(sha256=sha256_file(path) if hash_file else None, file=file, box_scale=info.source_width / info.width,
                video={"width": info.source_width, "height": info.source_height, "fps": round(info.fps, 3),
                       "duration_s": round(info.duration, 3), "frames": info.num_frames, "rotation": info.rotation,
                       "codec": info.codec, "stream": info.stream, "sar": round(info.sar, 4)})


def open_video(path: str, max_side: int | None):
    """The first steps of preparing any video, for the workers, NVDEC and the training cache:
    readable, its file's size and time, probed (before hashing: a huge file that is no video is
    not read whole). Returns (info, file)."""
    st = check_readable(path).stat()
    return probe(path, max_side), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def search_flags(clip_index: int) -> dict:
    """Which of a detector's searches a clip gets (the same schedule for workers, device and
    training cache): the small-face search on the first clip and every DEEP_EVERY-th, a crowd's
    beside sure large faces every CROWD_EVERY-th, the whole frame every FULL_EVERY-th."""
    return {"deep": clip_index % DEEP_EVERY == 0, "crowd": clip_index % faces_mod.CROWD_EVERY == 0,
            "full": clip_index % FULL_EVERY == 0}


def clip_faces(path: str, clip: Clip, detector, tracker, settings) -> list:
    """A decoded clip's face clips: detected (where ``tracker`` follows faces), filtered, linked
    to tracks and cut. ``tracker``: a ``faces.Tracker`` (scans: every face), or
    ``faces.LargestFace`` (the training cache: the largest only). ``settings``: a PrepSettings or
    a prepare.PrepareSettings (min_face, image_size, lda_size, margin, alignment)."""
    dets = faces_mod.filter_faces(detector(clip.frames[0], hints=tracker.recent(), follow=tracker.active(),
                                           min_face=settings.min_face, **search_flags(clip.index)), settings.min_face)
    dets, ids = tracker.pick(dets)
    return faces_mod.face_clips(path, clip, dets, ids, settings.image_size, settings.lda_size, settings.margin,
                                settings.alignment)


def sampling_of(planned: int, decoded: int, clip_len: int, face_clips: int, strategy: str) -> dict:
    """The record's ``sampling`` of a decoded video (one shape for every preparation)."""
    return {"clips": planned, "n": clip_len, "decoded_clips": decoded, "frames": decoded * clip_len,
            "face_clips": face_clips, "strategy": strategy}


def prepare_video(job, path: str, detector, settings: PrepSettings) -> Iterator:
    """Decode, detect, track and crop one video, yielding its events in order: ``Started``, then
    one ``faces.FaceClip`` per face and sampled clip, then ``Done`` (``job``: the pool's). A
    failure becomes the tail's ``error``; it is never raised. With ``detector=None`` it only
    decodes: one ``video.Clip`` per sampled clip instead of face clips (the device prepares
    them), and the tail's face-clip counts are left to the device."""
    head, tail = Head(), Tail()
    started = False
    try:
        info, file = open_video(path, settings.max_side)
        head = describe(path, info, settings.hash_files, file)
        yield Started(job, head)
        started = True
        clip_len = settings.clip_len
        if (info.num_frames or info.frames_exact) and not plan_clips(info.num_frames, settings.clips, clip_len):
            raise MediaError(f"{path}: only {info.num_frames} frame(s), fewer than the {clip_len} "
                             f"consecutive frames the model needs; use a longer video")
        report = DecodeReport()
        tracker = faces_mod.Tracker()
        timings = tail.timings
        timings.update(decode_s=0.0, detect_crop_s=0.0)
        count = aligned = 0
        t = time.perf_counter()
        for clip in sample_clips(info, settings.clips, clip_len, settings.strategy, report):
            t1 = time.perf_counter()
            timings["decode_s"] += t1 - t
            if detector is None:
                yield clip
                t = time.perf_counter()
                continue
            fcs = clip_faces(path, clip, detector, tracker, settings)
            t = time.perf_counter()
            timings["detect_crop_s"] += t - t1
            for fc in fcs:
                count += 1
                aligned += fc.aligned
                yield fc
            t = time.perf_counter()
        tail.face_clips = count
        tail.sampling = sampling_of(report.planned, report.decoded, clip_len, count, report.strategy)
        if settings.alignment != "none":  # how many crops the landmarks aligned (dlib gives none: square crops)
            tail.sampling["aligned_face_clips"] = aligned
        tail.video_frames = report.frames  # the length the plan used (counted again if the header was wrong)
        tail.warnings += report.warnings
        if report.warning:
            tail.warnings.append(report.warning)
        if report.decoded == 0:
            raise MediaError(f"{path}: no clip of {clip_len} consecutive frames could be decoded; "
                             "the file is damaged, truncated or too short")
    except DeepscanError as exc:
        tail.error = str(exc)
    except Exception as exc:  # an unexpected failure must not stop the other inputs
        if os.environ.get("DEEPSCAN_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        tail.error = f"{path}: unexpected {type(exc).__name__}: {exc}"
    if not started:
        yield Started(job, head)
    yield Done(job, tail)


# ---------------------------------------------------------------------------- the worker loop
class _Stop(Exception):
    pass


class _Fatal(NamedTuple):
    """A worker cannot work at all (its detector failed to load): the scan stops, saying why."""

    reason: str


def _worker_loop(conn, slots: list[int], slot_view: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 make_detector, settings: PrepSettings) -> None:
    """Serve jobs from ``conn`` until told to stop or the other end goes away.

    The worker keeps no rule of its own about slots: it uses the slots granted to it (all of its
    own at start, then each one the scanning process hands back) and waits when it has none.
    ``("cancel", run)`` drops the queued jobs of that run and ends the current one early (its
    ``done`` event still comes, so the pool knows the worker has moved on)."""
    jobs: deque = deque()  # (job, path); a job is (run, index)
    free: set[int] = set(slots)
    cancelled: set = set()  # runs whose jobs are to be dropped
    try:
        detector = make_detector() if settings.handover == "crops" else None
    except Exception as exc:  # noqa: BLE001 - reported to the scanning process, which stops
        conn.send(_Fatal(f"the face detector could not be set up in a preparation worker "
                         f"({type(exc).__name__}: {exc})"))
        conn.close()
        return

    def pump(block: bool) -> None:
        while block or conn.poll():
            block = False
            msg = conn.recv()
            if msg[0] == "job":
                jobs.append(msg[1:])
            elif msg[0] == "grant":
                free.update(msg[1])
            elif msg[0] == "cancel":
                cancelled.add(msg[1])
                for item in [j for j in jobs if j[0].run == msg[1]]:
                    jobs.remove(item)
            elif msg[0] == "stop":
                raise _Stop

    try:
        while True:
            if not jobs:
                pump(block=True)
                continue
            job, path = jobs.popleft()
            events = prepare_video(job, path, detector, settings)
            for ev in events:
                if job.run in cancelled:
                    break
                if isinstance(ev, (Started, Done)):
                    conn.send(ev)
                else:
                    while not free and job.run not in cancelled:
                        pump(block=True)  # every slot holds a clip: wait for the scanning process
                    if job.run in cancelled:
                        break
                    # the lowest free slot: the slots in use stay the first few, so the memory a scan
                    # touches follows the clips in flight, not the length of the scan
                    slot = min(free)
                    free.discard(slot)
                    if isinstance(ev, Clip):  # handing over frames: the device prepares
                        slot_view(slot, ev.frames.shape)[...] = ev.frames
                        conn.send(Frames(job, Slot(slot), FramesMeta(ev.index, ev.frame_indices, ev.times,
                                                                     ev.frames.shape)))
                    else:
                        image, frames = slot_view(slot)
                        image[...] = ev.image
                        frames[...] = ev.frames
                        conn.send(ClipEvent(job, Slot(slot), ClipMeta(ev.track_id, ev.clip_index, ev.frame_indices[0],
                                                                      ev.times[0], ev.box, ev.score)))
                pump(block=False)
            if job.run in cancelled:
                events.close()  # stops its ffmpeg
                conn.send(Done(job, Tail(error="cancelled", cancelled=True)))
    except (_Stop, EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        pass
    finally:
        conn.close()  # the other end sees EOF (a thread does not close it by ending)


def _slot_viewer(buf, settings: PrepSettings):
    shape_i, shape_f = settings.slot_shapes
    size_i = math.prod(shape_i)

    def view(slot: int, shape: tuple[int, ...] | None = None):
        """A slot's two crop arrays, or with ``shape`` the frames array of that shape."""
        base = slot * settings.slot_bytes
        if shape is not None:
            if math.prod(shape) > settings.slot_bytes:  # frames are at most max_side on a side
                raise MediaError(f"decoded frames of shape {tuple(shape)} exceed a slot; this is a bug, "
                                 "please report it (and try --preparation workers)")
            return np.ndarray(shape, np.uint8, buffer=buf, offset=base)
        return (np.ndarray(shape_i, np.uint8, buffer=buf, offset=base),
                np.ndarray(shape_f, np.uint8, buffer=buf, offset=base + size_i))

    return view


class SharedBlock:
    """The slots' memory, shared with the worker processes and named nowhere.

    On Linux an anonymous memfd: it has no name in /dev/shm, so whatever kills the scan's
    processes (a cgroup OOM kill of the whole group included) the kernel frees it with the last
    process that maps it. Workers receive the descriptor itself when they start (pickled as a
    ``DupFd``, which multiprocessing passes to the fork server), so a replacement started late
    attaches like the first ones. Elsewhere a named ``SharedMemory`` block, unlinked by
    ``close`` (or by multiprocessing's resource tracker if the scan dies)."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self.fd, self.shm = -1, None
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("deepscan-slots", os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, self.size)
                self.buf = mmap.mmap(self.fd, self.size)
            except BaseException as exc:
                os.close(self.fd)
                if isinstance(exc, OSError):
                    raise _no_room(self.size, exc) from None
                raise
        else:  # pragma: no cover - macOS
            self.shm = shared_memory.SharedMemory(create=True, size=self.size)
            self.buf = self.shm.buf

    def __reduce__(self):
        if self.shm is not None:  # pragma: no cover - macOS
            return _attach_named, (self.shm.name,)
        from multiprocessing import reduction

        return _attach_fd, (reduction.DupFd(self.fd), self.size)

    def close(self) -> None:
        if self.shm is not None:  # pragma: no cover - macOS
            self.shm.close()
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()
            return
        with contextlib.suppress(BufferError):
            self.buf.close()  # a view still exported (a batch being copied) keeps the mapping
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _no_room(size: int, exc: OSError) -> DeepscanError:
    """Shared memory refused: say which limit, and what to do, in one line."""
    if exc.errno == errno.EFBIG:
        what = "the file-size limit (ulimit -f) is below it; raise it with `ulimit -f unlimited`"
    else:
        what = "free some memory, or scan with fewer --workers"
    return DeepscanError(f"cannot set aside {size / 2**20:.0f} MB of shared memory for the workers' clips "
                         f"({exc.strerror or exc}): {what}")


def _attach_fd(dup, size: int):
    fd = dup.detach()
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)  # the mapping holds the memory


def _attach_named(name: str):  # pragma: no cover - macOS
    shm = shared_memory.SharedMemory(name=name)
    _attached.append(shm)  # kept open for the life of the worker
    return shm.buf


_attached: list = []

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the fork server, which ends with the
    scanning process) dies, so that no worker outlives a killed scan."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the parent died before the request: nobody will end us
        os._exit(1)


def _process_main(conn, block, slots: list[int], make_detector, settings: PrepSettings) -> None:
    """Entry point of a worker process; ``block`` arrives attached (see ``SharedBlock``)."""
    _die_with_parent()
    show_warnings_escaped()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scanning process decides when workers stop
    try:
        os.setpgrp()  # ... and Ctrl-C in a terminal reaches neither us nor our ffmpeg processes
    except OSError:
        pass
    _worker_loop(conn, slots, _slot_viewer(block, settings), make_detector, settings)


# ---------------------------------------------------------------------------- the pool
def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux's MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_context():
    """A fork server preloaded with this module: clean (no threads, no torch) and quick to fork."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["deepscan.scan.workers"])
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
    jobs: deque = field(default_factory=deque)  # (job, path) sent and not yet done, in order
    out: set = field(default_factory=set)  # slots holding clips the scanning process has not freed
    last_progress: float = 0.0
    stalled: bool = False  # killed for making no progress
    broken: bool = False  # a message to it could not be sent: it is dead or dying
    events: int = 0  # events received from the current process (0 at death: it died at start)
    started: object = None  # the last job whose "start" event arrived: the input it is reading


class PreparePool:
    """Worker processes (or one thread) preparing videos; see the module docstring.

    The pool owns the bookkeeping: which jobs each worker holds and which of its slots hold clips.
    A scan works in runs (``begin_run`` ... ``end_run``, ids from ``runs``); a job is ``Job(run,
    index)``. ``submit`` an input, then read ``poll``'s events (``events``), all of the current
    run: ``Started``, ``Clip`` (or, handing over frames, ``Frames``) with a ``Slot``, ``Done``,
    and ``Lost`` when the worker holding it died or stalled (a replacement has taken over by
    then). Events of an ended run are dropped here (their slots go straight back).
    ``view(slot)`` gives a slot's arrays; ``free(slots)`` grants them back to their worker once
    copied. The pool is a ``events.Source``."""

    def __init__(self, workers: int, settings: PrepSettings, make_detector, *, slots_per_worker: int = 16,
                 stall_s: float = 600.0, ctx=None):
        self.settings, self.make_detector = settings, make_detector
        self.threaded = workers == 0
        count = max(1, workers)
        self.slots_per_worker, self.stall_s = max(1, slots_per_worker), stall_s
        self.ctx = None if self.threaded else (ctx or default_context())
        total = count * self.slots_per_worker * settings.slot_bytes
        # A thread shares this process's memory: plain memory, never unmapped while it may write.
        self.block = np.zeros(max(1, total), np.uint8) if self.threaded else SharedBlock(total)
        self._view = _slot_viewer(self.block if self.threaded else self.block.buf, settings)
        self.workers = [_Worker(p, list(range(p * self.slots_per_worker, (p + 1) * self.slots_per_worker)))
                        for p in range(count)]
        self.replaced = 0
        self.failed_starts = 0  # deaths before a first event, in a row (reset by any worker's event)
        self.runs = Runs()  # the current run's id: shared with what stands in front (nvdec.NvdecPool)
        self._retried: set = set()  # jobs of this run handed to a replacement once, never begun
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
            w.proc.start()
        else:
            ours, theirs = self.ctx.Pipe()
            w.proc = self.ctx.Process(target=_process_main, name=f"deepscan-prepare-{w.position}", daemon=True,
                                      args=(theirs, self.block, free, self.make_detector, self.settings))
            with _main_module_hidden():
                w.proc.start()
            theirs.close()
        w.conn, w.events, w.broken, w.started = ours, 0, False, None
        w.last_progress = time.monotonic()
        for job in w.jobs:  # a replacement takes over the inputs queued for its predecessor
            self._send(w, ("job", *job))

    def _send(self, w: _Worker, msg) -> bool:
        """The one way a message reaches a worker. A pipe that fails means the worker is dead or
        dying: it is marked, and the next ``poll`` reports its input and replaces it."""
        try:
            w.conn.send(msg)
            return True
        except (OSError, ValueError):  # BrokenPipeError, ConnectionResetError; ValueError: closed
            w.broken = True
            return False

    def close(self) -> None:
        """Stop every worker (killing what does not stop at once) and release the shared memory.
        The kills run whatever interrupts the wait (a second Ctrl-C): no worker outlives this."""
        if self._closed:
            return
        self._closed = True
        try:
            for w in self.workers:
                if w.conn is not None:
                    self._send(w, ("stop",))
            deadline = time.monotonic() + 2.0
            for w in self.workers:
                if w.proc is not None and (self.threaded or w.proc.pid is not None):
                    w.proc.join(max(0.0, deadline - time.monotonic()))
        finally:
            for w in self.workers:
                if not self.threaded and w.proc is not None and w.proc.pid is not None and w.proc.is_alive():
                    self._kill(w)
                    with contextlib.suppress(BaseException):
                        w.proc.join(2.0)
                if w.conn is not None:
                    with contextlib.suppress(OSError):
                        w.conn.close()
            if not self.threaded:
                self.block.close()
            # (a preparation thread still busy keeps writing into self.block, which it holds)

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

    # ---- runs
    def begin_run(self) -> int:
        """Start a run: its jobs, and only its, are reported from now on."""
        self._retried = set()
        return self.runs.begin()

    def end_run(self, run: int) -> None:
        """End ``run``: workers drop its queued jobs and stop the one they prepare; whatever of it
        still arrives is dropped (and its slots granted back) by ``poll``."""
        self.runs.end(run)
        for w in self.workers:
            stale = [j for j in w.jobs if j[0].run == run]
            if not stale:
                continue
            current = w.jobs[0] if w.jobs and w.jobs[0][0].run == run else None
            for j in stale:
                if j is not current:
                    w.jobs.remove(j)  # never started, or dropped by the worker: no event will come
            self._send(w, ("cancel", run))

    # ---- work
    def capacity(self) -> int:
        return sum(JOBS_PER_WORKER - len(w.jobs) for w in self.workers if not w.broken)

    def outstanding(self, run: int) -> int:
        """Jobs of ``run`` sent and not yet done."""
        return sum(1 for w in self.workers for j in w.jobs if j[0].run == run)

    def submit(self, index: int, path: str) -> Job:
        """Send input ``index`` of the current run to the least busy worker; returns its job."""
        if not self.runs.current:
            raise RuntimeError("submit outside a run: call begin_run() first")
        live = [w for w in self.workers if not w.broken]
        w = min(live or self.workers, key=lambda w: len(w.jobs))
        if len(w.jobs) >= JOBS_PER_WORKER:
            raise RuntimeError("no capacity: check capacity() first")
        if not w.jobs:
            w.last_progress = time.monotonic()
        job = Job(self.runs.current, index)
        w.jobs.append((job, path))
        self._send(w, ("job", job, path))  # a dead worker: poll reports the job lost
        return job

    def view(self, slot: Slot, shape: tuple[int, ...] | None = None):
        """A slot's (image, frames) crops; with ``shape``, the decoded frames it holds."""
        return self._view(slot.number, shape)

    def free(self, slots) -> None:
        """Grant ``slots`` (``Slot``s) back to their workers (at once: a worker that has none waits)."""
        by_worker: dict[int, list[int]] = {}
        for s in slots:
            by_worker.setdefault(s.number // self.slots_per_worker, []).append(s.number)
        for p, ss in by_worker.items():
            w = self.workers[p]
            w.out.difference_update(ss)
            w.last_progress = time.monotonic()  # a worker that waited for slots has not stalled
            self._send(w, ("grant", ss))  # a dead one: its replacement starts with every slot not out

    def poll(self, timeout: float | None, extra=()) -> tuple[list, list]:
        """Wait up to ``timeout`` s for worker events or any of ``extra`` (waitable objects);
        returns (events of the current run, the ``extra`` objects that are ready)."""
        waitables = {w.conn: w for w in self.workers}
        if not self.threaded:
            waitables.update({w.proc.sentinel: w for w in self.workers})
        broken = [w for w in self.workers if w.broken]
        ready = connection.wait([*waitables, *extra], 0 if broken else timeout)
        events: list = []
        dead: list[_Worker] = []
        for r in ready:
            w = waitables.get(r)
            if w is None:
                continue
            self._drain(w, events, dead)  # whatever a dead worker sent before dying comes first
            if r is not w.conn and w not in dead:
                dead.append(w)
        for w in broken:
            if w not in dead:
                self._drain(w, events, dead)
                if not self.threaded:
                    self._kill(w)
                if w not in dead:
                    dead.append(w)
        now = time.monotonic()
        for w in self.workers:
            # stalled: it holds an input and slots to work with, and nothing came for stall_s
            if (w.jobs and not self.threaded and w not in dead and len(w.out) < len(w.slots)
                    and overdue(w.last_progress, now, self.stall_s)):
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
                if w.events == 0:
                    self.failed_starts = 0  # a worker that works: earlier deaths were not a pattern
                w.events += 1
                if isinstance(ev, _Fatal):
                    raise DeepscanError(ev.reason)
                job = ev.job
                if isinstance(ev, Started):
                    w.started = job
                elif isinstance(ev, (ClipEvent, Frames)):
                    w.out.add(ev.slot.number)
                elif isinstance(ev, Done):
                    for item in w.jobs:
                        if item[0] == job:
                            w.jobs.remove(item)
                            break
                if not self.runs.ours(job):  # an ended run's: dropped, its slot granted back
                    if isinstance(ev, (ClipEvent, Frames)):
                        self.free([ev.slot])
                    continue
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
        stalled, w.stalled = w.stalled, False
        if code is None:
            how = "its pipe broke"
        elif code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        events = []
        if w.jobs and not stalled and w.started != w.jobs[0][0] and w.jobs[0][0] not in self._retried:
            # it died before it began this input (e.g. killed while it waited, or while probing):
            # the input is not to blame, and the replacement takes it, once
            self._retried.add(w.jobs[0][0])
        elif w.jobs:
            job, path = w.jobs.popleft()
            if stalled:
                reason = (f"{path}: no progress for {self.stall_s:.0f} s while preparing it (a pathological or "
                          "blocking file?); skipped; raise --timeout if it is just very long")
            else:
                reason = (f"{path}: the preparation worker died while reading it ({how}; a crash in a decoder "
                          "or detector, or out of memory); skipped")
            if self.runs.ours(job):
                events.append(Lost(job, reason))
        # queued jobs of an ended run are not replayed
        w.jobs = deque(j for j in w.jobs if j[0].run == self.runs.current)
        with contextlib.suppress(OSError):
            w.conn.close()
        self.replaced += 1
        self._start(w)
        return events
