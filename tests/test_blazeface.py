"""BlazeFace from its .tflite file, run by torch: equal to LiteRT (the reference runtime), batched
equal to one by one, its ONNX export equal to torch, and faces found where dlib finds them."""

import json

import numpy as np
import pytest
import torch

from deepscan.blazeface import VARIANTS, build, letterbox, onnx_path, tflite_path
from deepscan.faces import BlazeFaceDetector, DetectorSpec, DlibDetector
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
    return BlazeFaceDetector(str(onnx_path("full")), threads=1), DlibDetector()


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


def test_a_scan_with_blazeface_names_it_in_the_record(media_dir, tiny_ckpt):
    from .test_hostile import cli

    r = cli(media_dir / "two_faces.mp4", "--weights", tiny_ckpt, "--json", "--detector", "blazeface", "--clips", "4",
            "--batch-size", "2", "--workers", "1")
    rec = json.loads(r.stdout)
    assert rec["detector"] == "blazeface" and len(rec["tracks"]) == 2, r.stderr
    assert DetectorSpec("blazeface", str(onnx_path("full"))).build().name == "blazeface"
