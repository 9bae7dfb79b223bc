"""The scan pipeline: background preparation in bursts, and CPU cores shared with it."""

import threading
import time

import numpy as np
import pytest
import torch

from deepscan.faces import DlibDetector
from deepscan.scan import Prefetch, Runner, ScanSettings, scan

from .conftest import tiny_model


def wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_prefetch_fills_the_queue_in_bursts_and_keeps_order():
    produced = []

    def items():
        for i in range(40):
            produced.append(i)
            yield i

    feed = Prefetch(items(), depth=8)  # rests when full until at most 2 are left
    it = iter(feed)
    got = [next(it)]

    def queued():
        return len(produced) - len(got)

    # full, resting (7 queued if the burst filled all 8 before the first was taken)
    wait_for(lambda: queued() >= 7 and not feed.busy)
    while queued() > 3:
        got.append(next(it))
    time.sleep(0.1)
    assert queued() == 3 and not feed.busy  # still resting
    got.append(next(it))  # 2 left: a new burst fills the queue again
    wait_for(lambda: queued() == 8)
    got += list(it)
    assert got == list(range(40))


def test_prefetch_surfaces_the_producers_exception():
    def items():
        yield 1
        raise ValueError("bad item")

    with pytest.raises(ValueError, match="bad item"):
        list(Prefetch(items(), depth=4))


def test_cpu_scan_shares_cores_without_changing_scores(media_dir):
    videos = [(str(media_dir / "carphone.mp4"), None), (str(media_dir / "two_faces.mp4"), None)]
    settings = ScanSettings(clips=5, batch_size=4, hash_files=False)
    threads = torch.get_num_threads()

    def frame_scores():
        runner = Runner(tiny_model(), torch.device("cpu"), torch.float32)
        results = scan(videos, runner, DlibDetector(), settings, lambda r: None)
        return [[f.score for f in frames] for r in results for _, frames in sorted(r.tracks.items())]

    shared = frame_scores()  # threads > 1: the model steps aside while preparation works
    assert torch.get_num_threads() == threads
    torch.set_num_threads(1)  # nothing to share: whole batches
    try:
        whole = frame_scores()
    finally:
        torch.set_num_threads(threads)
    assert len(shared) == 3 and [len(s) for s in shared] == [len(s) for s in whole]
    for a, b in zip(shared, whole):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: nothing to share")
def test_cpu_model_leaves_a_core_while_preparation_works(media_dir):
    threads = torch.get_num_threads()
    dlib = DlibDetector()

    def slow_detector(frame, hints=()):  # preparation still busy when the first batch is scored
        time.sleep(0.05)
        return dlib(frame, hints)

    slow_detector.name = "dlib"
    runner = Runner(tiny_model(), torch.device("cpu"), torch.float32)
    seen, call = [], runner.__call__

    class Recording:
        def __getattr__(self, name):
            return getattr(runner, name)

        def __call__(self, clips):
            seen.append((len(clips), torch.get_num_threads()))
            return call(clips)

    videos = [(str(media_dir / "carphone.mp4"), None)] * 3
    scan(videos, Recording(), slow_detector, ScanSettings(clips=8, batch_size=8, hash_files=False), lambda r: None)
    assert all(n <= 2 for n, _ in seen)  # steps of 2 clips
    assert seen[0][1] == threads - 1  # preparation working: one core left to it
    assert seen[-1][1] == threads  # the last batch comes after preparation is done
    assert torch.get_num_threads() == threads


def test_prefetch_thread_ends_when_the_consumer_stops_early():
    gate = threading.Event()

    def items():
        yield 0
        gate.wait()  # the rest only once the first has been taken: the queue then fills up
        yield from range(1, 100)

    feed = Prefetch(items(), depth=4)
    it = iter(feed)
    assert next(it) == 0
    gate.set()
    wait_for(lambda: feed._q.full() and not feed.busy)
    it.close()  # the consumer leaves with a full queue
    wait_for(lambda: not any(t.is_alive() and getattr(t, "_target", None) == feed._work for t in threading.enumerate()))
