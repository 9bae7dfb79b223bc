"""Stand-ins for a fast machine, driven by the real Scanner (issue 32, item 6): a preparation
``Source`` whose workers take a fixed time per face clip, and a model runner that takes a fixed
time per batch, whatever its size (fixed shapes). Nothing is decoded or scored: what is measured
is the pipeline's own cost (its loop, batcher, lanes and assembler) at a GPU's pace.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from multiprocessing import connection
from types import SimpleNamespace

import numpy as np

from deepscan.scan.events import Clip, ClipMeta, Done, Head, Job, Runs, Slot, Started, Tail, Waker
from deepscan.scan.workers import JOBS_PER_WORKER


class SimSource:
    """``workers`` threads; each prepares its jobs one after another, a face clip every
    ``clip_s`` seconds, ``clips`` clips a video; the pixels are one tiny shared array."""

    def __init__(self, workers: int, clips: int, clip_s: float, pixels: tuple[np.ndarray, np.ndarray]):
        self.runs = Runs()
        self.clips, self.clip_s, self.pixels = clips, clip_s, pixels
        self._events: collections.deque = collections.deque()
        self._ready = Waker()
        self._jobs = [collections.deque() for _ in range(workers)]
        self._lock = threading.Condition()
        self._closed = False
        self.first_clip, self.last_clip, self.clips_made = 0.0, 0.0, 0
        self.workers = [threading.Thread(target=self._work, args=(k,), daemon=True) for k in range(workers)]
        for t in self.workers:
            t.start()

    # ---- the Source protocol
    def begin_run(self) -> int:
        return self.runs.begin()

    def end_run(self, run: int) -> None:
        self.runs.end(run)

    def capacity(self) -> int:
        with self._lock:
            return sum(JOBS_PER_WORKER - len(q) for q in self._jobs)

    def outstanding(self, run: int) -> int:
        with self._lock:
            return sum(1 for q in self._jobs for j in q if j.run == run)

    def submit(self, index: int, path: str) -> Job:
        job = Job(self.runs.current, index)
        with self._lock:
            min(self._jobs, key=len).append(job)
            self._lock.notify_all()
        return job

    def poll(self, timeout, extra=()):
        ready = connection.wait([self._ready, *extra], timeout)
        if self._ready in ready:
            self._ready.clear()
        events = []
        while self._events:
            ev = self._events.popleft()
            if self.runs.ours(ev.job):
                events.append(ev)
        return events, [r for r in ready if r is not self._ready]

    def view(self, handle, shape=None):
        return self.pixels

    def free(self, handles) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._ready.close()

    # ---- the workers
    def _emit(self, ev) -> None:
        if isinstance(ev, Clip):  # the stage's own pace, as it ran (sleeps oversleep on a busy machine)
            now = time.perf_counter()
            self.first_clip = self.first_clip or now
            self.last_clip = now
            self.clips_made += 1
        self._events.append(ev)
        self._ready()

    def rate(self) -> float:
        """Face clips/s this preparation delivered, first clip to last."""
        return self.clips_made / max(1e-9, self.last_clip - self.first_clip)

    def _work(self, k: int) -> None:
        queue = self._jobs[k]
        while True:
            with self._lock:
                while not queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = queue[0]
            self._emit(Started(job, Head(video={"width": 1280, "height": 720, "fps": 25.0})))
            due = time.perf_counter()
            for c in range(self.clips):
                due += self.clip_s
                time.sleep(max(0.0, due - time.perf_counter()))
                self._emit(Clip(job, Slot(0), ClipMeta(1, c, c * 8, c * 0.32, (10.0, 10.0, 90.0, 90.0))))
            self._emit(Done(job, Tail(sampling={"clips": self.clips, "face_clips": self.clips},
                                      face_clips=self.clips)))
            with self._lock:
                queue.popleft()


class SimRunner:
    """A model on one GPU lane: every batch takes ``batch_s`` (padded to one shape)."""

    backend = "sim"
    threads = 1

    def __init__(self, cfg, batch_s: float):
        self.cfg, self.batch_s = cfg, batch_s
        self.device = SimpleNamespace(type="cuda")
        self.batches: list[int] = []

    def score_batch(self, images, frames):
        time.sleep(self.batch_s)
        self.batches.append(len(images))
        return np.full(len(images), 0.25, np.float32), {}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def cores() -> int:
    return len(os.sched_getaffinity(0))
