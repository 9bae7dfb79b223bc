"""NVDEC decoding in threads of the scanning process (``--decoder nvdec``; PyNvVideoCodec, the
``deepscan[nvdec]`` extra), for preparation on the device.

A GPU's video engines decode H.264/HEVC far faster than a CPU core, and the frames land in GPU
memory, where device preparation wants them. ``NvdecPool`` stands in front of the preparation
workers (``workers.PreparePool``, which keep decoding with ffmpeg) and has their interface: each
input goes to a decoder thread when one is free and the file is one NVDEC decodes as ffmpeg
would (``eligible``), else to the workers. A thread probes the file (ffmpeg's description, as
the workers do), plans the same clips (``video.plan_clips``), decodes their frames by index and
hands them over as tensors on the device, with the events the workers send (``start``,
``Frames``, ``Done``), so the scanner treats both alike.

Written by hand because no library feeds decoded frames of many files, from several decoders at
once, into a pipeline that also takes ffmpeg's: PyNvVideoCodec gives a decoder per file
(``SimpleDecoder``, reused through ``reconfigure_decoder``); the rest is this file.

What is checked where: ``available`` loads the driver's ``libnvcuvid.so.1`` and the module and
decodes a small generated H.264 file once at start (a failure is one notice, and ffmpeg
decodes); ``tests/test_cuda.py`` compares NVDEC's frames with ffmpeg's where a GPU has NVDEC; the
suite runs this file's plumbing on the CPU with a stand-in decoder (tests/fake_nvc.py).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import traceback
from typing import Callable, NamedTuple

import torch

from ..errors import DeepscanError
from .events import Done, Frames, FramesMeta, Job, Lost, Started, Tail, Token, Waker, overdue
from .workers import PrepSettings

CODECS = ("h264", "hevc")  # decoded by the NVDEC engine of every GPU this runs on
PIX_FMTS = ("yuv420p",)  # 8-bit 4:2:0, limited range: NVDEC's RGB conversion matches ffmpeg's (tested)
THREADS = 8  # decoder threads (an H100/H200 has 7 NVDEC engines; one more keeps them busy)
AHEAD = 8  # decoded clips a thread may have waiting for the device before it pauses
CHUNK = 8  # clips decoded per call (get_batch_frames_by_index)


def load(module=None):
    """The PyNvVideoCodec module, or an exception saying why not (no driver library, no module)."""
    if module is not None:
        return module
    import ctypes

    try:
        ctypes.CDLL("libnvcuvid.so.1")
    except OSError as exc:
        raise DeepscanError("the NVIDIA driver here has no libnvcuvid.so.1 (NVDEC is not exposed)") from exc
    try:
        import PyNvVideoCodec as nvc  # noqa: N813
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a library that fails to load
        raise DeepscanError(f"PyNvVideoCodec cannot be imported ({type(exc).__name__}: {exc}); "
                            "pip install 'deepscan[nvdec]'") from exc
    return nvc


CHECK_VIDEO = "nvdec-check-v1.mp4"  # 16 frames of 128x72 H.264, made once per cache folder


def _encode_check(path: str) -> None:
    import subprocess

    from ..video import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=128x72:rate=25", "-frames:v", "16", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    path], check=True, capture_output=True, timeout=60)


def check_video() -> str | None:
    """The short H.264 file NVDEC's start check decodes, made by ffmpeg once and kept in deepscan's
    cache folder (a scan does not encode a video at every start); None where that folder cannot
    hold it (``available`` then makes one in a temporary folder)."""
    import tempfile

    from ..errors import cache_home

    kept = cache_home() / CHECK_VIDEO
    if kept.is_file() and kept.stat().st_size > 0:
        return str(kept)
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=kept.parent)
        os.close(fd)
    except OSError:
        return None
    try:
        _encode_check(tmp)
        os.replace(tmp, kept)  # whole or not at all: a check never reads a half-written file
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return str(kept)


def available(device: torch.device, module=None, workdir: str | None = None) -> str | None:
    """None if NVDEC decodes here (``check_video``, decoded and compared in shape), else the
    reason, for the one notice a scan gives."""
    import tempfile

    try:
        nvc = load(module)
        path = check_video()
        if path is not None:
            return _decodes_check(nvc, path, device)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = os.path.join(tmp, "check.mp4")
            _encode_check(path)
            return _decodes_check(nvc, path, device)
    except DeepscanError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - whatever the driver or module raises
        return f"NVDEC failed on a check video ({type(exc).__name__}: {str(exc)[:200]})"


def _decodes_check(nvc, path: str, device: torch.device) -> str | None:
    dec = _open(nvc, path, device)
    frame = _frame(dec.get_batch_frames_by_index([3])[0], 72, 128, device)
    if tuple(frame.shape) != (72, 128, 3) or len(dec) != 16:
        return f"NVDEC decoded a check video wrongly (shape {tuple(frame.shape)}, {len(dec)} frames)"
    return None


def eligible(info) -> str | None:
    """None if NVDEC decodes ``info``'s video as the ffmpeg workers would, else why not: other
    codecs and pixel formats, rotation, non-square pixels and scaled-down frames (ffmpeg applies
    them), several video streams, damage, or a length only estimated."""
    if info.codec not in CODECS:
        return f"codec {info.codec}"
    if info.pix_fmt not in PIX_FMTS:
        return f"pixel format {info.pix_fmt or 'unknown'}"
    if info.rotation or abs(info.sar - 1.0) > 1e-3:
        return "rotated or non-square pixels"
    if (info.width, info.height) != (info.native_width, info.native_height) or info.width % 2 or info.height % 2:
        return "frames scaled or of odd size"
    if info.video_streams != 1 or info.stream != 0:
        return "several video streams"
    if info.damage:
        return "damaged"
    if not info.frames_exact:
        return "frame count estimated"
    return None


def _open(nvc, path: str, device: torch.device):
    return nvc.SimpleDecoder(path, gpu_id=(device.index or 0) if device.type == "cuda" else 0, use_device_memory=True,
                             output_color_type=nvc.OutputColorType.RGB)


def _frame(decoded, h: int, w: int, device: torch.device) -> torch.Tensor:
    """A decoded frame as an (h, w, 3) uint8 tensor on ``device``, without a copy where possible."""
    t = torch.from_dlpack(decoded)
    return t.reshape(h, w, 3).to(device)


class _Fallback(Exception):
    """This input is for the ffmpeg workers (raised before its ``start`` event); ``reset``: the
    decoder failed on it, and is not to be reused."""

    def __init__(self, why: str, reset: bool = False):
        super().__init__(why)
        self.reset = reset


class _GiveBack(NamedTuple):
    """A thread gives an input back to the ffmpeg workers (internal to this module)."""

    job: Job
    path: str
    why: str


class NvdecPool:
    """Decoder threads in front of a ``PreparePool`` (see the module docstring): an
    ``events.Source`` as the pool is, sharing its ``runs``, so the Scanner uses either. Events of
    NVDEC's inputs carry their frames: ``Frames(job, Token, FramesMeta, tensor)``, the token given
    back to its thread by ``free``."""

    def __init__(self, pool, settings: PrepSettings, device: torch.device, *, threads: int = THREADS, module=None,
                 say: Callable[[str], None] | None = None, stall_s: float = 600.0):
        self.pool, self.settings, self.device, self.say = pool, settings, torch.device(device), say
        self.nvc = load(module)
        self.runs = pool.runs  # one owner of the run's id: the pool's
        self._jobs: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self._wake = Waker()
        self._inflight: dict = {}  # job -> path, sent to a thread and not done
        self._backlog: list = []  # (job, path) the threads gave back, for the workers
        self._tokens = [threading.Semaphore(AHEAD) for _ in range(threads)]
        self._stop = threading.Event()
        self._said = False
        self.decoded = self.fell_back = self.stalled = 0
        self.stall_s = stall_s
        self._holder: dict = {}  # job -> the thread (its number, its generation) working on it
        self._progress: dict = {}  # job -> time.monotonic() of its last event
        self._generation = [0] * threads  # a stalled thread is abandoned: its successor has the next
        self._threads = [self._start(k) for k in range(threads)]

    def _start(self, k: int) -> threading.Thread:
        t = threading.Thread(target=self._serve, args=(k, self._generation[k]), name=f"deepscan-nvdec-{k}",
                             daemon=True)
        t.start()
        return t

    @property
    def workers(self):
        return self.pool.workers

    @property
    def replaced(self) -> int:
        return self.pool.replaced

    @property
    def threaded(self) -> bool:
        return self.pool.threaded

    # ---- the Source interface
    def begin_run(self) -> int:
        return self.pool.begin_run()

    def end_run(self, run: int) -> None:
        self.pool.end_run(run)
        self._backlog = [(j, p) for j, p in self._backlog if j.run != run]
        # queued jobs of the run are skipped by the threads (they check the run), and events of
        # it that arrive are dropped by poll

    def capacity(self) -> int:
        mine = 2 * len(self._threads) - len(self._inflight)
        return max(0, mine) + max(0, self.pool.capacity() - len(self._backlog))

    def outstanding(self, run: int) -> int:
        return (self.pool.outstanding(run) + sum(1 for j in self._inflight if j.run == run)
                + sum(1 for j, _ in self._backlog if j.run == run))

    def view(self, handle, shape: tuple[int, ...] | None = None):
        return self.pool.view(handle, shape)  # NVDEC's frames come with their events, in no slot

    def submit(self, index: int, path: str) -> Job:
        job = Job(self.runs.current, index)
        if len(self._inflight) < 2 * len(self._threads):
            self._inflight[job] = path
            self._jobs.put((job, path))
            return job
        return self.pool.submit(index, path)

    def free(self, handles) -> None:
        now = time.monotonic()
        for s in (s for s in handles if isinstance(s, Token)):
            k, generation = s
            if generation != self._generation[k]:
                continue  # an abandoned thread's: its successor has its own tokens
            self._tokens[k].release()
            for job, holder in list(self._holder.items()):
                if holder[0] == k:
                    self._progress[job] = now  # a thread that waited for the device has not stalled
        theirs = [s for s in handles if not isinstance(s, Token)]
        if theirs:
            self.pool.free(theirs)

    def poll(self, timeout: float | None, extra=()) -> tuple[list, list]:
        timeout = 0 if not self._out.empty() else timeout
        events, ready = self.pool.poll(timeout, extra=[*extra, self._wake])
        if self._wake in ready:
            self._wake.clear()
            ready = [r for r in ready if r is not self._wake]
        while True:
            try:
                ev = self._out.get_nowait()
            except queue.Empty:
                break
            job = ev.job
            if isinstance(ev, Frames) and job not in self._inflight:  # from an abandoned thread: its job is gone
                self.free([ev.slot])
                continue
            if job not in self._inflight:
                continue
            self._progress[job] = time.monotonic()
            if isinstance(ev, (Done, _GiveBack)):
                self._inflight.pop(job, None)
                self._progress.pop(job, None)
                self._holder.pop(job, None)
            if not self.runs.ours(job):  # an ended run's: dropped
                if isinstance(ev, Frames):
                    self.free([ev.slot])
                continue
            if isinstance(ev, _GiveBack):
                self.fell_back += 1
                self._backlog.append((job, ev.path))
                if not self._said and self.say:
                    self._said = True
                    self.say(f"note: NVDEC does not decode every input here (first: {ev.why}); the ffmpeg workers "
                             "decode those")
                continue
            if isinstance(ev, Done) and not ev.tail.error:
                self.decoded += 1
            events.append(ev)
        while self._backlog and self.pool.capacity() > 0:
            job, path = self._backlog.pop(0)
            self.pool.submit(job.index, path)
        events += self._abandon_stalled()
        return events, ready

    def _abandon_stalled(self) -> list:
        """An input whose decoder thread has sent nothing for stall_s (a decoder that hangs on a
        file) becomes a ``lost`` event, as a stalled worker's does; the thread, which cannot be
        stopped, is abandoned (what it sends later is dropped) and a new one takes its place."""
        now, out = time.monotonic(), []
        for job, since in list(self._progress.items()):
            if not overdue(since, now, self.stall_s) or job not in self._holder:
                continue
            k, generation = self._holder.pop(job)
            path = self._inflight.pop(job, "?")
            self._progress.pop(job, None)
            self.stalled += 1
            if self.runs.ours(job):
                out.append(Lost(job, f"{path}: NVDEC made no progress for {self.stall_s:.0f} s while decoding "
                                         "it; skipped; raise --timeout if it is just very long, or use --decoder ffmpeg"))
            if generation == self._generation[k]:
                self._generation[k] += 1
                self._tokens[k] = threading.Semaphore(AHEAD)  # the old one's tokens are lost with it
                self._threads[k] = self._start(k)
        return out

    def close(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(5.0)
        self._wake.close()
        self.pool.close()

    # ---- the decoder threads
    def _emit(self, ev) -> None:
        self._out.put(ev)
        self._wake()

    def _serve(self, k: int, generation: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        decoder = None
        while not self._stop.is_set() and generation == self._generation[k]:
            item = self._jobs.get()
            if item is None:
                return
            job, path = item
            if job.run != self.runs.current:
                self._emit(Done(job, Tail(error="cancelled", cancelled=True)))
                continue
            self._holder[job] = (k, generation)
            self._progress.setdefault(job, time.monotonic())
            started: list = []
            try:
                decoder = self._prepare(k, generation, job, path, decoder, started)
            except _Fallback as why:
                if why.reset:
                    decoder = None
                self._emit(_GiveBack(job, path, f"{path}: {why}"))
            except Exception as exc:  # noqa: BLE001 - never a silent thread: the input fails or goes to the workers
                if os.environ.get("DEEPSCAN_DEBUG", "") not in ("", "0"):
                    traceback.print_exc()
                decoder = None
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
                if started:
                    self._emit(Done(job, Tail(error=f"{path}: NVDEC failed while reading it ({why})")))
                else:
                    self._emit(_GiveBack(job, path, f"{path}: {why}"))

    def _prepare(self, k: int, generation: int, job, path: str, decoder, started: list):
        """One input: probe, plan, decode its clips' frames, hand them over (events as
        ``workers.prepare_video``'s). Raises _Fallback before its ``start`` when the workers should
        decode it. Returns the decoder, kept for the next file."""
        from ..errors import MediaError
        from ..video import plan_clips
        from .workers import describe, open_video, sampling_of

        s = self.settings
        tail = Tail(timings={"decode_s": 0.0})
        try:
            info, file = open_video(path, s.max_side)
        except (MediaError, OSError, ValueError) as exc:
            raise _Fallback(str(exc)) from None  # the workers give it its error record, as for any input
        why = eligible(info)
        if why:
            raise _Fallback(why)
        try:
            if decoder is None:
                decoder = _open(self.nvc, path, self.device)
            else:
                decoder.reconfigure_decoder(path)  # a cached decoder of the same shape is reused
            if len(decoder) != info.num_frames:
                raise _Fallback(f"NVDEC counts {len(decoder)} frames, ffmpeg {info.num_frames}")
        except _Fallback:
            raise
        except Exception as exc:  # noqa: BLE001 - the decoder cannot open it: the workers can try
            raise _Fallback(f"NVDEC cannot open it ({type(exc).__name__}: {str(exc)[:200]})", reset=True) from None
        self._emit(Started(job, describe(path, info, s.hash_files, file)))
        started.append(True)
        n = s.clip_len
        starts = plan_clips(info.num_frames, s.clips, n)
        decoded = 0
        try:
            for c0 in range(0, len(starts), CHUNK):
                chunk = starts[c0:c0 + CHUNK]
                t = time.perf_counter()
                frames = decoder.get_batch_frames_by_index([i + j for i in chunk for j in range(n)])
                if len(frames) != len(chunk) * n:
                    raise MediaError(f"{path}: NVDEC returned {len(frames)} of {len(chunk) * n} frames")
                clips = [torch.stack([_frame(f, info.height, info.width, self.device) for f in frames[q * n:(q + 1) * n]])
                         for q in range(len(chunk))]  # copies: the decoder reuses its frame buffers
                if self.device.type == "cuda":  # whole before the device stage reads them, on its own stream
                    torch.cuda.current_stream(self.device).synchronize()
                tail.timings["decode_s"] += time.perf_counter() - t
                for q, (start, clip) in enumerate(zip(chunk, clips)):
                    tokens = self._tokens[k]
                    while not tokens.acquire(timeout=0.5):  # the device is behind: wait
                        if self._stop.is_set() or job.run != self.runs.current or generation != self._generation[k]:
                            raise _Cancelled  # (or this thread was abandoned: nobody frees its tokens)
                    if job.run != self.runs.current:
                        tokens.release()
                        raise _Cancelled
                    idx = tuple(range(start, start + n))
                    meta = FramesMeta(c0 + q, idx, tuple(round(i / info.fps, 4) for i in idx), tuple(clip.shape))
                    self._emit(Frames(job, Token(k, generation), meta, clip))
                    decoded += 1
        except _Cancelled:
            self._emit(Done(job, Tail(error="cancelled", cancelled=True)))
            return decoder
        except DeepscanError as exc:
            tail.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one input's failure, never the scan's
            if os.environ.get("DEEPSCAN_DEBUG", "") not in ("", "0"):
                traceback.print_exc()
            tail.error = f"{path}: NVDEC failed while decoding it ({type(exc).__name__}: {str(exc)[:200]})"
            decoder = None  # a fresh decoder for the next file
        tail.sampling = sampling_of(len(starts), decoded, n, 0, "nvdec")
        tail.video_frames = info.num_frames
        self._emit(Done(job, tail))
        return decoder


class _Cancelled(Exception):
    pass
