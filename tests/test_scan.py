"""The scan pipeline: preparation workers, order, crashes and stalls, several devices, CPU lanes."""

import threading
import time

import numpy as np
import pytest
import torch

from deepscan.faces import DetectorSpec
from deepscan.scan.plan import ScanInput
from deepscan.scan import Runner, ScanSettings, cpu_lanes, scan

from . import media
from .conftest import tiny_model
from .detectors import POISON_SIZE, PoisonSpec

SETTINGS = ScanSettings(clips=4, batch_size=4, hash_files=False)


def frame_scores(records):
    return {r["path"]: [f["score"] for t in r["tracks"] for f in t["frames"]] for r in records}


@pytest.fixture(scope="module")
def poison(tmp_path_factory):
    h, w = POISON_SIZE
    rng = np.random.default_rng(1)
    return media.write_video(tmp_path_factory.mktemp("poison") / "poison.mp4",
                             [rng.integers(0, 255, (h, w, 3), np.uint8) for _ in range(10)])


def inputs(media_dir, *names):
    return [ScanInput(str(media_dir / n), n) for n in names]


def test_records_keep_input_order_and_scores_with_any_number_of_workers(media_dir, tmp_path):
    items = inputs(media_dir, "carphone.mp4", "missing.mp4", "astronaut.mp4", "no_face.mp4", "two_faces.mp4")
    items.insert(3, ScanInput(str(tmp_path), "empty", f"{tmp_path}: folder holds no files"))
    runs = {}
    for workers in (0, 1, 2):
        runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=4)
        runs[workers] = scan(items, runner, DetectorSpec("dlib"), SETTINGS, workers=workers)
    for records in runs.values():
        assert [r["path"] for r in records] == [i.path for i in items]
        verdicts = [r["verdict"] for r in records]
        assert verdicts[1] == verdicts[3] == "error" and verdicts[0] in ("fake", "real")
        assert records[4]["verdict"] == "no-face" and len(records[5]["tracks"]) == 2
    ref = frame_scores(runs[0])
    for workers in (1, 2):
        got = frame_scores(runs[workers])
        assert got.keys() == ref.keys()
        for path in ref:
            np.testing.assert_allclose(got[path], ref[path], atol=1e-5)
    # nothing per frame is kept once a record is out: records are plain JSON-ready data
    assert all(set(f) == {"index", "time_s", "score", "box"} for r in runs[2] for t in r["tracks"] for f in t["frames"])


def test_a_killed_worker_costs_only_its_input(media_dir, poison):
    items = inputs(media_dir, "carphone.mp4", "astronaut.mp4") + [ScanInput(str(poison), "poison.mp4")] \
        + inputs(media_dir, "two_faces.mp4", "astronaut.mp4")
    runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=4)
    records = scan(items, runner, PoisonSpec("kill"), SETTINGS, workers=2)
    assert [r["path"] for r in records] == [i.path for i in items]
    bad = records[2]
    assert bad["verdict"] == "error" and "worker died" in bad["error"] and "SIGKILL" in bad["error"]
    assert bad["error"].startswith(str(poison)) and "\n" not in bad["error"]
    assert all(r["verdict"] in ("fake", "real") for r in records[:2] + records[3:])


def test_an_input_that_makes_no_progress_is_abandoned(media_dir, poison):
    items = [ScanInput(str(poison), "poison.mp4")] + inputs(media_dir, "astronaut.mp4")
    runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=4)
    settings = ScanSettings(clips=2, batch_size=4, hash_files=False, timeout_s=3)
    t = time.monotonic()
    records = scan(items, runner, PoisonSpec("hang"), settings, workers=1)
    assert time.monotonic() - t < 60
    assert records[0]["verdict"] == "error" and "no progress for 3 s" in records[0]["error"]
    assert records[1]["verdict"] in ("fake", "real")


def test_every_device_gets_batches_and_scores_are_the_same(media_dir):
    items = inputs(media_dir, "carphone.mp4", "two_faces.mp4", "astronaut.mp4", "carphone.mp4")
    one = scan(items, Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=2), DetectorSpec("dlib"),
               ScanSettings(clips=6, batch_size=2, hash_files=False), workers=1)
    first = Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=2)
    runners = [first, first.replica(torch.device("cpu"))]  # two "devices": the multi-GPU code path on CPU
    used = []
    for r in runners:
        score = r.score

        def spy(images, frames, score=score, r=r):
            used.append(id(r))
            time.sleep(0.05)  # a slow device: the other one gets work meanwhile
            return score(images, frames)

        r.score = spy
    two = scan(items, runners, DetectorSpec("dlib"), ScanSettings(clips=6, batch_size=2, hash_files=False), workers=1)
    assert set(used) == {id(r) for r in runners}
    a, b = frame_scores(one), frame_scores(two)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose(a[path], b[path], atol=1e-5)


def test_cpu_lanes_split_the_threads():
    assert cpu_lanes(1) == [1] and cpu_lanes(2) == [1, 1] and cpu_lanes(3) == [1, 1, 1]
    assert cpu_lanes(10) == [2, 2, 1, 1, 1, 1, 1, 1] and cpu_lanes(16) == [2] * 8 and cpu_lanes(0) == [1]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: one lane")
@pytest.mark.parametrize("workers", [0, 1])
def test_cpu_scan_scores_in_single_threaded_lanes_side_by_side(media_dir, workers):
    threads = torch.get_num_threads()
    items = inputs(media_dir, "carphone.mp4", "two_faces.mp4", "astronaut.mp4")
    settings = ScanSettings(clips=8, batch_size=2, hash_files=False)
    runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=2)
    seen, score, lock = [], runner.score, threading.Lock()
    state = {"now": 0, "most": 0}

    def recording(images, frames):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            seen.append((threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.1)  # a slow step: the other lane takes the next batch meanwhile
        try:
            return score(images, frames)
        finally:
            with lock:
                state["now"] -= 1

    runner.score = recording
    lanes = frame_scores(scan(items, runner, DetectorSpec("dlib"), settings, workers=workers))
    assert len({name for name, _ in seen}) == len(cpu_lanes(threads)) and all(t == 1 for _, t in seen)
    assert state["most"] >= 2  # lanes really score at the same time
    assert torch.get_num_threads() == threads  # the caller's thread count is untouched
    torch.set_num_threads(1)  # one lane
    try:
        one = frame_scores(scan(items, Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=2),
                                DetectorSpec("dlib"), settings, workers=workers))
    finally:
        torch.set_num_threads(threads)
    assert one.keys() == lanes.keys()
    for path in one:
        np.testing.assert_allclose(lanes[path], one[path], atol=1e-5)
