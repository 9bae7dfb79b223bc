"""Model lanes: the threads that score batches, each on a runner (``score``). A GPU has one
lane; the CPU one per ``cpu_lanes`` entry, all on one runner (inference is stateless, so lanes
share a set of weights), each with its own thread count. ``Lanes`` owns the batches in flight:
the queue of batches not yet started, the scorer threads, and their results.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

MAX_CPU_LANES = 8  # each lane holds a step's activations (~120 MB a clip at full size, fp32)


@dataclass
class Batch:
    """Face clips on their way through a lane: whose they are, their pixels, their run."""

    entries: list  # (input index, events.ClipMeta) per clip
    images: object  # (B, S, S, 3) uint8: numpy, or a tensor cut on the device
    frames: object  # (B, n, s, s, 3) uint8
    run: int = 0  # the run it belongs to: results of an ended run are dropped
    ready: object = None  # crops cut on a GPU: the CUDA event after which they are whole


class Scored(NamedTuple):
    """A batch's result: P(fake) and maps, or ``failure`` (the scan stops), and its seconds."""

    batch: Batch
    probs: np.ndarray | None
    maps: dict | None
    seconds: float
    failure: BaseException | None = None


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


class Scorer(threading.Thread):
    """One model lane: a runner and a thread scoring batches from the shared queue. A GPU has
    one; the CPU has one per ``cpu_lanes`` entry, all on the same runner (inference is
    stateless, so lanes share one set of weights), each with its own thread count."""

    def __init__(self, runner, jobs: queue.Queue, results: queue.Queue, wake: Callable[[], None],
                 threads: int = 0, lane: int = 0):
        super().__init__(name=f"deepscan-score-{runner.device}-{lane}", daemon=True)
        self.runner, self.jobs, self.results, self.wake, self.threads = runner, jobs, results, wake, threads
        self.working = False

    def run(self) -> None:
        r = self.runner
        lane = contextlib.nullcontext()
        if getattr(r, "backend", "torch") == "torch":  # OpenVINO sets its own threads: no torch here
            import torch

            if r.device.type == "cpu":
                torch.set_num_threads(self.threads or r.threads)  # a new thread starts with the default
            lane = r.lane() if hasattr(r, "lane") else lane
        with lane:
            self._serve(r)

    def _serve(self, r) -> None:
        """Warm up, then score batches until told to stop. On a GPU a batch is queued
        (``launch``) before the one before it is waited for (``collect``), so the device never
        idles while this thread waits for results; elsewhere each batch is scored at once."""
        warm_failure = None
        try:
            if hasattr(r, "warm"):  # every batch shape once, in this thread, while preparation starts
                r.warm()
        except BaseException as exc:  # noqa: BLE001 - reported with the first batch, which fails with it
            warm_failure = exc
        ahead = hasattr(r, "launch") and r.device.type == "cuda"
        pending = None  # (batch, launched, start) queued and not yet collected
        while True:
            if pending is not None:
                try:
                    batch = self.jobs.get_nowait()
                except queue.Empty:  # nothing to queue behind it: wait for its results now
                    self._finish(r, *pending)
                    pending = None
                    continue
            else:
                self.working = False
                batch = self.jobs.get()
            if batch is None:
                break
            self.working = True
            t = time.perf_counter()
            try:
                if warm_failure is not None:
                    raise warm_failure
                if ahead:
                    launched = r.launch(batch.images, batch.frames, ready=batch.ready)
                else:
                    probs, maps = r.score_batch(batch.images, batch.frames)
                    if r.device.type == "cpu":
                        release_free_memory()
            except BaseException as exc:  # noqa: BLE001 - handed to the scanning thread, which stops
                if pending is not None:
                    self._finish(r, *pending)
                    pending = None
                self.results.put(Scored(batch, None, None, 0.0, exc))
                self.wake()
                continue
            if pending is not None:
                self._finish(r, *pending)
            if ahead:
                pending = (batch, launched, t)
            else:
                pending = None
                self.results.put(Scored(batch, probs, maps, time.perf_counter() - t))
                self.wake()
        if pending is not None:
            self._finish(r, *pending)
        self.working = False

    def _finish(self, r, batch, launched, start) -> None:
        try:
            probs, maps = r.collect(launched)
            self.results.put(Scored(batch, probs, maps, time.perf_counter() - start))
        except BaseException as exc:  # noqa: BLE001 - handed to the scanning thread, which stops
            self.results.put(Scored(batch, None, None, 0.0, exc))
        self.wake()


def model_lanes(runners: list) -> list[tuple[object, int]]:
    """(runner, CPU threads) of each model lane: one per GPU runner, ``cpu_lanes`` per CPU runner."""
    return [(r, t) for r in runners for t in (cpu_lanes(r.threads) if r.device.type == "cpu" else [0])]


def _lane_scorers(runners: list, jobs: queue.Queue | list[queue.Queue], results: queue.Queue,
                  wake: Callable[[], None]) -> list[Scorer]:
    """A Scorer per lane (``model_lanes``), taking from ``jobs`` (or from its own entry of it)."""
    return [Scorer(r, jobs[k] if isinstance(jobs, list) else jobs, results, wake, threads, k)
            for k, (r, threads) in enumerate(model_lanes(runners))]


def score_in_lanes(runners: list, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Score ``batches`` of (images, frames) through the very lanes a Scanner runs, and wait (the
    model alone at a scan's settings, for benchmarks); the first failure is raised."""
    jobs: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    scorers = _lane_scorers(runners, jobs, results, lambda: None)
    for images, frames in batches:
        jobs.put(Batch([], images, frames))
    for s in scorers:
        jobs.put(None)
        s.start()
    for s in scorers:
        s.join()
    while not results.empty():
        failure = results.get_nowait().failure
        if failure is not None:
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


class Lanes:
    """The model lanes of a scanner: at most two batches per lane wait to start; each result
    wakes the scanning thread (``wake``). With ``homes``, each runner's lanes have a queue of
    their own (``put(batch, home)``: the crops of a device's preparation stay on that device);
    otherwise every lane takes from one queue."""

    def __init__(self, runners: list, wake: Callable[[], None], homes: bool = False):
        self._results: queue.Queue = queue.Queue()
        lanes = model_lanes(runners)
        groups = [[k for k, (r, _) in enumerate(lanes) if r is runner] for runner in runners] if homes \
            else [list(range(len(lanes)))]
        self._queues = [queue.Queue(maxsize=2 * len(g)) for g in groups]
        home_of = {k: h for h, g in enumerate(groups) for k in g}
        self._scorers = _lane_scorers(runners, [self._queues[home_of[k]] for k in range(len(lanes))], self._results,
                                      wake)
        self._homes = [[self._scorers[k] for k in g] for g in groups]
        for s in self._scorers:
            s.start()

    def full(self, home: int = 0) -> bool:
        return self._queues[home].full()

    def idle(self, home: int = 0) -> bool:
        """No batch waits and a lane has nothing to do: a part-filled batch may leave now."""
        return self._queues[home].empty() and any(not s.working for s in self._homes[home])

    def put(self, batch: Batch, home: int = 0) -> None:
        self._queues[home].put(batch)

    def results(self):
        """The results that have come, as ``Scored``."""
        while True:
            try:
                yield self._results.get_nowait()
            except queue.Empty:
                return

    def drop_waiting(self) -> None:
        """Batches not yet started are dropped (their run ended); a stop request stays."""
        for jobs in self._queues:
            while True:
                try:
                    batch = jobs.get_nowait()
                except queue.Empty:
                    break
                if batch is None:
                    jobs.put_nowait(None)
                    break

    def close(self, timeout: float) -> bool:
        """Stop the lanes (a batch in progress is waited for); True if every thread ended."""
        for jobs in self._queues:
            while True:
                try:
                    jobs.get_nowait()
                except queue.Empty:
                    break
        for s in self._scorers:
            try:
                s.jobs.put_nowait(None)
            except queue.Full:
                pass
        deadline = time.monotonic() + timeout
        for s in self._scorers:
            s.join(max(0.0, deadline - time.monotonic()))
        return not any(s.is_alive() for s in self._scorers)
