"""What passes between a scan's stages: typed events, the handles of the pixels they point to,
the one rule for runs and stalls, the waker, and the ``Source`` protocol every preparation
(the worker pool, NVDEC in front of it) implements.

Plain data only (no numpy, no torch): the worker processes send these very objects through
their pipes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, Union


class Job(NamedTuple):
    """An input of a run: the run's id (results of an ended run are dropped) and its index."""

    run: int
    index: int


# ---------------------------------------------------------------------------- handles
class Slot(NamedTuple):
    """A slot of the worker pool's shared memory (``workers.PreparePool``) holding a clip."""

    number: int


class Token(NamedTuple):
    """A decoded clip an NVDEC thread holds on the device (``nvdec.NvdecPool``): given back, it
    lets that thread decode one more."""

    thread: int
    generation: int  # a stalled thread is abandoned: tokens of an older generation are void


Handle = Union[Slot, Token]  # what a Source's ``free`` takes back; None: the pixels travel with the event


# ---------------------------------------------------------------------------- payloads
@dataclass
class Head:
    """What preparation says of a video when it starts: its record's sha256, file, video."""

    sha256: str | None = None
    video: dict | None = None  # the record's ``video`` (width, height, fps, ...)
    file: dict | None = None  # {"size", "mtime_ns"}
    box_scale: float = 1.0  # decoded-frame pixels -> source pixels (frames scaled down in ffmpeg)


@dataclass
class Tail:
    """What preparation says of a video when it ends (``error`` set: it failed)."""

    error: str | None = None
    sampling: dict = field(default_factory=dict)  # the record's ``sampling``
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    face_clips: int = 0
    video_frames: int | None = None  # the length the sampling used (the header may have been wrong)
    cancelled: bool = False  # its run ended first


@dataclass
class ClipMeta:
    """A face clip without its pixels: what the scanning process needs besides the slot."""

    track_id: int
    clip_index: int
    frame_index: int  # the frame the model classifies (the clip's first)
    time_s: float
    box: tuple[float, float, float, float]  # detector box in decoded-frame pixels
    det_score: float = 1.0  # the detector's confidence in the face (assemble.CONFIRM_SINGLE)


class FramesMeta(NamedTuple):
    """A decoded clip handed over for the device to prepare: what is in the slot."""

    clip_index: int
    frame_indices: tuple[int, ...]
    times: tuple[float, ...]
    shape: tuple[int, ...]  # (n, H, W, 3) uint8 at the start of the slot


# ---------------------------------------------------------------------------- events
class Started(NamedTuple):
    job: Job
    head: Head


class Clip(NamedTuple):
    """A face clip ready for the model, in ``slot`` (``pixels``: cut on the device instead)."""

    job: Job
    slot: Handle | None
    meta: ClipMeta
    pixels: object = None  # (image, frames) tensors cut on the device


class Frames(NamedTuple):
    """A decoded clip for the device to prepare, in ``slot`` (``pixels``: NVDEC's, on the device)."""

    job: Job
    slot: Handle
    meta: FramesMeta
    pixels: object = None


class Done(NamedTuple):
    job: Job
    tail: Tail


class Lost(NamedTuple):
    """The input's worker died or stalled: ``reason`` becomes its error."""

    job: Job
    reason: str


Event = Union[Started, Clip, Frames, Done, Lost]


# ---------------------------------------------------------------------------- runs and stalls
class Runs:
    """The one owner of the current run's id, shared by a source and what stands in front of it.
    A job is ``ours`` only while its run is the current one: everything else is dropped (and its
    pixels given back) where it arrives."""

    def __init__(self):
        self.current = 0  # 0: none
        self._count = 0

    def begin(self) -> int:
        self._count += 1
        self.current = self._count
        return self.current

    def end(self, run: int) -> None:
        if self.current == run:
            self.current = 0

    def ours(self, job: Job) -> bool:
        return bool(self.current) and job.run == self.current


def overdue(last_progress: float, now: float, stall_s: float) -> bool:
    """The stall rule of every source: nothing came for ``stall_s`` seconds (while it could work)."""
    return now - last_progress > stall_s


# ---------------------------------------------------------------------------- the waker
class Waker:
    """A pipe threads write a byte to, so the scanning thread wakes from its wait. Closed under a
    lock: a slow thread that finishes after the scan never writes into a closed descriptor (whose
    number may belong to another file by then)."""

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


# ---------------------------------------------------------------------------- the protocol
class Source(Protocol):
    """A preparation: inputs in, events of the current run out. The source is the only code that
    reads a handle: the scanner gives each back through ``free`` once it has copied the pixels."""

    runs: Runs

    def begin_run(self) -> int: ...

    def end_run(self, run: int) -> None: ...

    def submit(self, index: int, path: str) -> Job: ...

    def poll(self, timeout: float | None, extra=()) -> tuple[list[Event], list]: ...

    def view(self, handle: Handle, shape: tuple[int, ...] | None = None): ...

    def free(self, handles) -> None: ...

    def capacity(self) -> int: ...

    def outstanding(self, run: int) -> int: ...

    def close(self) -> None: ...
