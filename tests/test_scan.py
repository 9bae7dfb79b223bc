"""The scan pipeline: preparation workers, order, crashes and stalls, several devices, core sharing."""

import time

import numpy as np
import pytest
import torch

from deepscan.faces import DetectorSpec, DlibDetector
from deepscan.inputs import ScanInput
from deepscan.scan import Runner, ScanSettings, scan

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


def test_cpu_scan_shares_cores_without_changing_scores(media_dir):
    items = inputs(media_dir, "carphone.mp4", "two_faces.mp4")
    threads = torch.get_num_threads()

    def scores():
        runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=4)
        return frame_scores(scan(items, runner, DetectorSpec("dlib"), SETTINGS, workers=1))

    shared = scores()  # threads > 1: the model steps aside while preparation works
    assert torch.get_num_threads() == threads
    torch.set_num_threads(1)  # nothing to share: whole batches
    try:
        whole = scores()
    finally:
        torch.set_num_threads(threads)
    for path in shared:
        np.testing.assert_allclose(shared[path], whole[path], atol=1e-5)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: nothing to share")
@pytest.mark.parametrize("workers", [0, 1])
def test_cpu_model_leaves_a_core_while_preparation_works(media_dir, workers, poison):
    threads = torch.get_num_threads()
    runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=8)
    seen, score = [], runner.score

    def recording(images, frames):
        seen.append((len(images), torch.get_num_threads()))
        return score(images, frames)

    runner.score = recording
    if workers == 0:
        dlib = DlibDetector()

        def detector(frame, hints=(), **kw):  # preparation still busy when the first batch is scored
            time.sleep(0.05)
            return dlib(frame, hints, **kw)

        detector.name = "dlib"
    else:
        detector = DetectorSpec("dlib")
    items = inputs(media_dir, "carphone.mp4", "carphone.mp4", "carphone.mp4", "carphone.mp4")
    scan(items, runner, detector, ScanSettings(clips=8, batch_size=8, hash_files=False), workers=workers,
         slots_per_worker=8)  # a worker out of slots rests: the model then has every core
    assert all(n <= 2 for n, _ in seen)  # steps of 2 clips
    assert any(t == threads - 1 for _, t in seen)  # preparation working: one core left to it
    assert seen[-1][1] == threads  # the last batch comes after preparation is done
    assert torch.get_num_threads() == threads
