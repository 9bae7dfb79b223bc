"""Preparation on the model's device (``--preparation device``), run on the CPU here: PIL's
letterbox and crops reproduced exactly, the same faces as the workers' onnxruntime detector, and
whole scans whose records equal the workers' (scores, tracks, boxes, counts, errors)."""

import copy

import numpy as np
import pytest
import torch

from PIL import Image

from deepscan.blazeface import letterbox
from deepscan.scan.device import DevicePreparer, crop_batch, letterbox_many, pil_resize
from deepscan.faces import box_iou, crop_box, crop_square, face_clips, resolve_detector
from deepscan.scan import Runner, ScanSettings, scan
from deepscan.video import plan_clips, probe, read_clips

from .conftest import tiny_model


@pytest.fixture(scope="module")
def prep():
    return DevicePreparer("cpu")


def clips_of(media_dir, names, count=2, n=3):
    out = []
    for name in names:
        info = probe(media_dir / name)
        out += list(read_clips(info, plan_clips(info.num_frames, count, n), n))
    return out


def test_letterbox_and_crops_equal_pils_to_the_bit():
    from skimage import data

    rng = np.random.default_rng(0)
    face = data.astronaut()
    # 720p and 1080p take PIL's reducing_gap route (an integer reduction, then a fractional box)
    for h, w in [(720, 1280), (1080, 1920), (1920, 1080), (144, 176), (333, 517), (100, 90), (192, 192), (50, 2000)]:
        frame = np.asarray(Image.fromarray(face).resize((w, h))).copy()
        frame[::7, ::5] = rng.integers(0, 256, frame[::7, ::5].shape)  # detail that rounding would show
        for size in (192, 128):
            assert np.array_equal(letterbox_many([torch.from_numpy(frame)], size)[0].numpy(), letterbox(frame, size)[0])
    for side, size in [(300, 224), (100, 398), (1000, 224), (57, 62), (224, 224)]:
        square = np.asarray(Image.fromarray(face).resize((side, side)))
        want = crop_square(square, (0, 0, side, side), size)
        assert np.array_equal(pil_resize(torch.from_numpy(square.copy())[None], size)[0].numpy(), want)
    # many faces of many sizes, some leaving the frame (black there), in one batch of two clips
    clips = [np.asarray(Image.fromarray(face).resize((w, 300))) for w in (400, 400)]
    clips = [np.stack([c, c[::-1]]) for c in clips]
    boxes = [(0, (-30, -40, 170, 160)), (1, (250, 200, 400, 350)), (0, (100, 50, 157, 107)), (1, (10, 10, 410, 410)),
             (0, (120, 80, 344, 304))]
    images, frames = crop_batch([torch.from_numpy(c) for c in clips], boxes, 62, 224)
    for k, (ci, box) in enumerate(boxes):
        assert np.array_equal(images[k].numpy(), crop_square(clips[ci][0], box, 62))
        for j in range(2):
            assert np.array_equal(frames[k, j].numpy(), crop_square(clips[ci][j], box, 224))


def test_frames_of_several_videos_in_one_batch_find_the_workers_faces(prep, media_dir):
    clips = clips_of(media_dir, ["carphone.mp4", "astronaut.mp4", "two_faces.mp4", "no_face.mp4"], n=1)
    frames = [c.frames[0] for c in clips]  # 176x144, 640x360 ...: sizes differ within the batch
    got = prep.detect([torch.from_numpy(f) for f in frames])
    workers = resolve_detector("blazeface").build()
    want = [workers(f) for f in frames]  # the same staged search, on onnxruntime
    assert [len(d) for d in got] == [len(d) for d in want] and sum(map(len, got)) >= 6
    for a, b in zip(got, want):
        for da, db in zip(a, b):  # the same letterbox: only the networks' arithmetic differs
            assert max(abs(p - q) for p, q in zip(da.box, db.box)) < 0.5 and box_iou(da.box, db.box) > 0.99


SCANNED = ["carphone.mp4", "astronaut.mp4", "two_faces.mp4", "no_face.mp4", "rotated.mp4", "vfr.mp4",
           "truncated.mp4", "audio.m4a", "one_frame.mp4"]


def spread_model():
    model = tiny_model(seed=2)
    with torch.no_grad():
        model.backbone.get_classifier().weight.mul_(2e5)  # scores that spread over (0, 1): small crop changes show
    return model


def frames_of(record):
    return [(t["id"], f["index"], f["score"], f["box"]) for t in record["tracks"] for f in t["frames"]]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_scan_prepared_on_the_device_equals_the_workers_scan(media_dir, workers):
    items = [(str(media_dir / n), None) for n in SCANNED]
    spec = resolve_detector("blazeface")
    model = spread_model()
    runs = {}
    for prep in ("workers", "device"):
        runner = Runner(copy.deepcopy(model), torch.device("cpu"), torch.float32, batch_size=4)
        settings = ScanSettings(clips=6, batch_size=4, hash_files=False, preparation=prep)
        runs[prep] = scan(items, runner, spec, settings, workers=workers)
    verdicts = [r["verdict"] for r in runs["device"]]
    assert verdicts.count("error") == 2 and verdicts.count("no-face") == 1 and len(set(verdicts)) >= 3
    scores = [f[2] for r in runs["device"] for f in frames_of(r)]
    assert len(scores) >= 30 and max(scores) - min(scores) > 0.05
    for w, d in zip(runs["workers"], runs["device"]):
        assert (d["path"], d["verdict"], d["error"], d["sampling"]) == (w["path"], w["verdict"], w["error"], w["sampling"])
        got, want = frames_of(d), frames_of(w)
        assert [f[:2] for f in got] == [f[:2] for f in want] and [f[3] for f in got] == [f[3] for f in want]
        assert max([abs(a[2] - b[2]) for a, b in zip(got, want)] or [0]) < 1e-4
        if d["verdict"] in ("real", "fake"):
            assert d["timings"]["detect_crop_s"] > 0  # the device's share, counted per video


def test_device_preparation_needs_blazeface():
    from deepscan.errors import ConfigError
    from deepscan.scan import pick_preparation

    assert pick_preparation("auto", "blazeface") == "workers"
    assert pick_preparation("device", "blazeface") == "device"
    with pytest.raises(ConfigError, match="--detector dlib"):
        pick_preparation("device", "dlib")
    with pytest.raises(ConfigError, match="--preparation must be"):
        pick_preparation("gpu", "blazeface")


def test_cli_scan_prepared_on_the_device_writes_heatmaps(media_dir, tiny_ckpt, tmp_path):
    from .test_cli import json_lines, run_cli

    out = tmp_path / "heat"
    result = run_cli("scan", media_dir / "astronaut.mp4", media_dir / "no_face.mp4", "--weights", tiny_ckpt, "--json",
                     "--clips", "4", "--device", "cpu", "--preparation", "device", "--workers", "1",
                     "--heatmaps", out)
    assert result.returncode in (0, 1), result.stderr
    face, none = json_lines(result.stdout)
    assert face["verdict"] in ("real", "fake") and face["detector"] == "blazeface" and face["sampling"]["face_clips"] == 4
    assert none["verdict"] == "no-face" and none["sampling"]["face_clips"] == 0
    (folder,) = out.iterdir()
    assert len(list(folder.glob("rank*.png"))) >= 1
    bad = run_cli("scan", media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--preparation", "device",
                  "--detector", "dlib")
    assert bad.returncode == 2 and "--preparation device" in bad.stderr and "Traceback" not in bad.stderr


def test_crops_match_the_cpu_crops(prep, media_dir):
    clips = clips_of(media_dir, ["astronaut.mp4", "two_faces.mp4"])
    worker = resolve_detector("blazeface").build()
    cpu, squares, frames = [], [], []
    for ci, clip in enumerate(clips):
        dets = worker(clip.frames[0])
        cpu += face_clips("v", clip, dets, list(range(len(dets))), 62, 32)
        squares += [(ci, crop_box(d.box)) for d in dets]
        frames.append(clip.frames)
    images, lda = prep.crops(torch.from_numpy(np.stack(frames)), squares, 62, 32)
    assert images.shape == (len(cpu), 62, 62, 3) and lda.shape == (len(cpu), 3, 32, 32, 3)
    want_images, want_frames = np.stack([c.image for c in cpu]), np.stack([c.frames for c in cpu])
    for got, want in ((images, want_images), (lda, want_frames)):
        assert np.array_equal(got.numpy(), want)  # PIL's filters, its fixed point and rounding


def test_scores_on_device_crops_are_within_the_bf16_tolerance(prep, media_dir):
    worker = resolve_detector("blazeface").build()
    cpu, images, lda = [], [], []
    for name in ("astronaut.mp4", "two_faces.mp4", "carphone.mp4"):  # crops batch the clips of one frame size
        clips = clips_of(media_dir, [name], count=3)
        squares = []
        for ci, clip in enumerate(clips):
            dets = worker(clip.frames[0])
            cpu += face_clips("v", clip, dets, list(range(len(dets))), 62, 32)
            squares += [(ci, crop_box(d.box)) for d in dets]
        i, f = prep.crops(torch.from_numpy(np.stack([c.frames for c in clips])), squares, 62, 32)
        images.append(i.numpy())
        lda.append(f.numpy())
    model = tiny_model(seed=2)
    with torch.no_grad():
        model.backbone.get_classifier().weight.mul_(2e5)  # scores that spread over (0, 1)
    runner = Runner(copy.deepcopy(model), torch.device("cpu"), torch.float32)
    want, _ = runner.score(np.stack([c.image for c in cpu]), np.stack([c.frames for c in cpu]))
    got, _ = runner.score(np.concatenate(images), np.concatenate(lda))
    assert len(want) >= 10 and want.max() - want.min() > 0.1, want
    assert np.abs(got - want).max() < 0.02, np.abs(got - want).max()


def test_a_decoding_worker_killed_mid_video_costs_that_video_only(media_dir):
    """Workers that only decode die like the others: the video being read becomes an error
    record, its decoded clips waiting for the device are dropped (their slots back), and the
    replacement worker prepares the rest."""
    import os
    import signal
    import threading
    import time

    from deepscan.scan.plan import ScanInput
    from deepscan.scan import Scanner

    names = ["astronaut.mp4", "two_faces.mp4", "carphone.mp4"]
    runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=4)
    settings = ScanSettings(clips=24, batch_size=4, hash_files=False, preparation="device")
    spec = resolve_detector("blazeface")
    records = []
    with Scanner([runner], spec.build, spec.name, settings, workers=1) as scanner:
        w = scanner.pool.workers[0]

        def kill_when_busy():
            deadline = time.monotonic() + 60
            while w.events < 4 and time.monotonic() < deadline:  # its "start" and some decoded clips
                time.sleep(0.005)
            os.kill(w.proc.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        scanner.run([ScanInput(str(media_dir / n), n) for n in names], lambda rec, row: records.append(rec))
        killer.join()
        assert scanner.pool.replaced == 1
        assert all(len(x.out) == 0 for x in scanner.pool.workers)  # every slot came back
    first, *rest = records
    assert first["verdict"] == "error" and "worker died" in first["error"] and first["tracks"] == []
    assert [r["verdict"] for r in rest] != ["error", "error"] and all(r["error"] is None for r in rest)
    assert all(r["sampling"]["face_clips"] >= 24 for r in rest)


def test_nvdec_threads_feed_device_preparation_and_hand_the_rest_to_the_workers(media_dir, tmp_path):
    """NvdecPool's plumbing with a stand-in decoder (ffmpeg's frames, through DLPack): what NVDEC
    decodes goes to the device in its own events, what it must not (rotated, an audio file, a
    file the decoder refuses) goes to the ffmpeg workers, and every record equals the workers'
    scan of the same inputs."""
    import shutil

    from deepscan.scan.plan import ScanInput
    from deepscan.scan import Scanner

    from . import fake_nvc

    shutil.copy(media_dir / "astronaut.mp4", tmp_path / "poison.mp4")  # the stand-in cannot open it
    paths = [media_dir / n for n in ("carphone.mp4", "two_faces.mp4", "rotated.mp4", "audio.m4a", "no_face.mp4",
                                      "astronaut.mp4")] + [tmp_path / "poison.mp4"]
    items = [ScanInput(str(p), p.name) for p in paths]
    spec = resolve_detector("blazeface")
    model = spread_model()
    runs, said = {}, []
    for decoder in ("ffmpeg", "nvdec"):
        runner = Runner(copy.deepcopy(model), torch.device("cpu"), torch.float32, batch_size=4)
        settings = ScanSettings(clips=5, batch_size=4, hash_files=False, preparation="device", decoder=decoder)
        records = []
        with Scanner([runner], spec.build, spec.name, settings, workers=1, nvdec_module=fake_nvc,
                     say=said.append) as scanner:
            scanner.run(items, lambda rec, row: records.append(rec))
            if decoder == "nvdec":
                pool = scanner.pool
                # carphone (non-square pixels), rotated, audio, poison: the workers'
                assert (pool.decoded, pool.fell_back) == (3, 4)
                assert len(pool._inflight) == 0 and not pool._backlog
        runs[decoder] = records
    assert any("NVDEC does not decode every input" in s for s in said)
    strategies = [r["sampling"].get("strategy") for r in runs["nvdec"]]
    assert [s == "nvdec" for s in strategies] == [False, True, False, False, True, True, False]
    assert fake_nvc.opened.count(str(tmp_path / "poison.mp4")) == 1
    for a, b in zip(runs["ffmpeg"], runs["nvdec"]):
        assert (a["path"], a["verdict"], a["error"]) == (b["path"], b["verdict"], b["error"])
        assert a["sampling"]["face_clips"] == b["sampling"].get("face_clips", 0) if a["sampling"] else True
        got, want = frames_of(b), frames_of(a)
        assert [f[:2] for f in got] == [f[:2] for f in want] and [f[3] for f in got] == [f[3] for f in want]
        assert max([abs(x[2] - y[2]) for x, y in zip(got, want)] or [0]) < 1e-4
    assert {r["verdict"] for r in runs["nvdec"]} >= {"error", "no-face"}


def test_decoder_choice(monkeypatch):
    from deepscan.errors import ConfigError
    from deepscan.scan import pick_decoder

    from . import fake_nvc

    cpu = torch.device("cpu")
    assert pick_decoder("auto", "device", cpu) == "ffmpeg"  # NVDEC is for GPUs: no check, no notice
    assert pick_decoder("auto", "workers", cpu) == "ffmpeg"
    with pytest.raises(ConfigError, match="needs --preparation device"):
        pick_decoder("nvdec", "workers", cpu)
    with pytest.raises(ConfigError, match="--decoder nvdec: NVDEC needs a CUDA device"):
        pick_decoder("nvdec", "device", cpu)
    assert pick_decoder("nvdec", "device", cpu, module=fake_nvc) == "nvdec"  # the start check decodes a file
    with pytest.raises(ConfigError, match="--decoder must be"):
        pick_decoder("gpu", "device", cpu)
    with pytest.raises(ConfigError, match="needs --preparation device"):
        ScanSettings(decoder="nvdec")


def test_a_decoder_thread_that_hangs_costs_its_video_only(media_dir, tmp_path):
    """An NVDEC decode that never returns: after --timeout its video is an error record (as a
    stalled worker's), the thread is abandoned and replaced, and the other videos are scanned."""
    import shutil

    from deepscan.scan.plan import ScanInput
    from deepscan.scan import Scanner

    from . import fake_nvc

    shutil.copy(media_dir / "astronaut.mp4", tmp_path / "hang.mp4")
    paths = [tmp_path / "hang.mp4", media_dir / "two_faces.mp4", media_dir / "astronaut.mp4"]
    spec = resolve_detector("blazeface")
    runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, batch_size=4)
    settings = ScanSettings(clips=4, batch_size=4, hash_files=False, preparation="device", decoder="nvdec",
                            timeout_s=3.0)
    records = []
    fake_nvc.release.clear()
    try:
        with Scanner([runner], spec.build, spec.name, settings, workers=1, nvdec_module=fake_nvc) as scanner:
            scanner.run([ScanInput(str(p), p.name) for p in paths], lambda rec, row: records.append(rec))
            assert scanner.pool.stalled == 1 and not scanner.pool._inflight
            fake_nvc.release.set()  # the abandoned thread wakes up; what it sends is dropped
    finally:
        fake_nvc.release.set()
    hung, *rest = records
    assert hung["verdict"] == "error" and "NVDEC made no progress for 3 s" in hung["error"]
    assert [r["verdict"] for r in rest] != ["error"] * 2 and all(r["error"] is None for r in rest)
    assert [r["sampling"]["strategy"] for r in rest] == ["nvdec", "nvdec"]


def test_the_nvdec_check_video_is_made_once_and_kept(monkeypatch, tmp_path):
    from deepscan.scan import nvdec

    from . import fake_nvc

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kept = tmp_path / "deepscan" / nvdec.CHECK_VIDEO
    assert nvdec.available(torch.device("cpu"), fake_nvc) is None and kept.stat().st_size > 0
    made = kept.stat().st_mtime_ns
    assert nvdec.check_video() == str(kept)
    assert nvdec.available(torch.device("cpu"), fake_nvc) is None
    assert kept.stat().st_mtime_ns == made  # a second start encoded nothing
    assert [p.name for p in kept.parent.iterdir()] == [nvdec.CHECK_VIDEO]  # no temporary file left
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # a cache that cannot hold it: made in a temporary folder, removed after
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    work = tmp_path / "work"
    work.mkdir()
    assert nvdec.check_video() is None
    assert nvdec.available(torch.device("cpu"), fake_nvc, workdir=str(work)) is None and not list(work.iterdir())


def test_each_runner_prepares_the_videos_it_scores(media_dir):
    """Two runners with --preparation device (two GPUs; here two CPU runners): each prepares its own
    share of the videos, in its own preparer, and its lanes score exactly those; the records equal
    a one-runner scan's."""
    from deepscan.scan.pipeline import Scanner
    from deepscan.scan.plan import ScanInput

    items = [ScanInput(str(media_dir / n), n) for n in ("carphone.mp4", "astronaut.mp4", "two_faces.mp4", "no_face.mp4")]
    spec = resolve_detector("blazeface")
    model = spread_model()
    settings = ScanSettings(clips=4, batch_size=4, hash_files=False, preparation="device")
    one = scan(items, Runner(copy.deepcopy(model), torch.device("cpu"), torch.float32, batch_size=4), spec, settings)
    runners = [Runner(copy.deepcopy(model), torch.device("cpu"), torch.float32, batch_size=4) for _ in range(2)]
    scored = {id(r): set() for r in runners}
    for r in runners:
        score = r.score_batch

        def spy(images, frames, _r=r, _score=score):
            scored[id(_r)].add(len(images))
            return _score(images, frames)
        r.score_batch = spy
    records = []
    with Scanner(runners, spec.build, spec.name, settings) as scanner:
        scanner.run(items, lambda record, row: records.append(record))
        preps = scanner.device_preps
    assert len(preps) == 2 and all(sum(p.frames_per_step.values()) > 0 for p in preps)
    assert all(scored[id(r)] for r in runners)  # both lanes scored
    for a, b in zip(one, records):
        assert (a["path"], a["verdict"], a["sampling"]) == (b["path"], b["verdict"], b["sampling"])
        assert frames_of(a) == frames_of(b)
