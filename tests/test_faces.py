import numpy as np

from deepscan.faces import (DlibDetector, ScrfdDetector, Tracker, box_iou, crop_box, crop_square, face_clips,
                            filter_faces, nms, Detection)
from deepscan.video import plan_clips, probe, read_clips


def _detect_video(path, clips=6, clip_len=3):
    info = probe(path)
    det, tracker, out = DlibDetector(), Tracker(), []
    for clip in read_clips(info, plan_clips(info.num_frames, clips, clip_len), clip_len):
        dets = filter_faces(det(clip.frames[0]))
        out.extend(face_clips(str(path), clip, dets, tracker.assign(dets), 62, 32))
    return out


def test_known_face_is_found_in_real_talking_head(media_dir):
    fcs = _detect_video(media_dir / "carphone.mp4", clips=8)
    assert len(fcs) >= 7 and {f.track_id for f in fcs} == {0}
    x1, y1, x2, y2 = fcs[0].box
    assert 40 < (x1 + x2) / 2 < 140 and 20 < (y1 + y2) / 2 < 120  # the face is mid-frame


def test_two_faces_give_two_tracks(media_dir):
    fcs = _detect_video(media_dir / "two_faces.mp4")
    tracks = {}
    for f in fcs:
        tracks.setdefault(f.track_id, []).append((f.box[0] + f.box[2]) / 2)
    assert len(tracks) == 2
    left, right = sorted(tracks.values(), key=np.mean)
    assert max(left) < 320 < min(right)  # each track stays on its own side


def test_no_face_video_gives_nothing(media_dir):
    assert _detect_video(media_dir / "no_face.mp4") == []


def test_crops_share_one_box_per_clip_and_have_model_sizes(media_dir):
    fcs = _detect_video(media_dir / "astronaut.mp4", clips=2)
    fc = fcs[0]
    assert fc.image.shape == (62, 62, 3) and fc.frames.shape == (3, 32, 32, 3)
    x1, y1, x2, y2 = fc.crop_box
    assert x2 - x1 == y2 - y1  # square
    # the face moves 2 px per frame under a fixed box: the crops differ, the box does not
    assert not np.array_equal(fc.frames[0], fc.frames[2])


def test_crop_pads_at_borders_instead_of_stretching():
    frame = np.full((100, 100, 3), 200, np.uint8)
    box = crop_box((-20, -20, 40, 40), margin=1.0)
    assert box == (-20, -20, 40, 40)
    out = crop_square(frame, box, 60)
    assert out.shape == (60, 60, 3)
    assert out[:15, :15].max() == 0 and out[-10:, -10:].min() == 200


def test_tracker_links_by_overlap_and_opens_new_tracks():
    t = Tracker()
    a, b = Detection((0, 0, 50, 50), 1), Detection((200, 0, 250, 50), 1)
    assert t.assign([a, b]) == [0, 1]
    assert t.assign([Detection((205, 2, 255, 52), 1), Detection((3, 1, 53, 51), 1)]) == [1, 0]
    assert t.assign([Detection((500, 500, 550, 550), 1)]) == [2]


def test_scrfd_output_decoding():
    det = ScrfdDetector.__new__(ScrfdDetector)
    det.det_size, det.threshold, det.nms = 64, 0.5, 0.4
    outs = []
    for stride in det.strides:
        n = (64 // stride) ** 2 * 2
        outs.append(np.zeros((n, 1), np.float32))
    for stride in det.strides:
        outs.append(np.ones(((64 // stride) ** 2 * 2, 4), np.float32))
    for stride in det.strides:
        outs.append(np.zeros(((64 // stride) ** 2 * 2, 10), np.float32))
    # one confident anchor at stride 16, cell (x=2, y=1): centre (32, 16)
    outs[1][(1 * 4 + 2) * 2, 0] = 0.9
    outs[4][(1 * 4 + 2) * 2] = [1, 0.5, 1, 0.5]  # distances in strides: 16, 8, 16, 8 px
    found = det.decode(outs, scale=0.5)
    assert len(found) == 1
    assert np.allclose(found[0].box, [(32 - 16) / 0.5, (16 - 8) / 0.5, (32 + 16) / 0.5, (16 + 8) / 0.5])
    assert np.allclose(found[0].landmarks[0], (64, 32))
    assert found[0].score == np.float32(0.9)


def test_nms_keeps_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    assert nms(boxes, np.array([0.5, 0.9, 0.7]), 0.4) == [1, 2]


def test_installed_onnxruntime_runs_an_scrfd_shaped_session(tmp_path):
    import onnxruntime

    from . import media

    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()
    path = media.scrfd_like_onnx(tmp_path / "det.onnx", size=64, face=(16, 8, 48, 56))
    det = ScrfdDetector(str(path), det_size=64)
    frame = np.full((128, 128, 3), 100, np.uint8)  # scale 0.5: boxes come back doubled
    (found,) = det(frame)
    assert np.allclose(found.box, (32, 16, 96, 112), atol=1e-3) and found.score > 0.89
    assert len(found.landmarks) == 5 and np.allclose(found.landmarks[2], (64, 64), atol=1e-3)
    assert det(np.zeros((128, 128, 3), np.uint8)) == []  # the graph really ran on the input


def test_auto_detector_uses_cached_scrfd_and_falls_back_to_dlib(tmp_path, monkeypatch):
    import hashlib
    import json

    from deepscan import weights
    from deepscan.faces import make_detector

    from . import media
    from .fakehub import FakeHub

    model = media.scrfd_like_onnx(tmp_path / "det.onnx").read_bytes()
    entry = {"name": "scrfd-test", "kind": "detector", "variant": None, "repo_id": "t/det",
             "revision": "f" * 40, "filename": "det.onnx", "sha256": hashlib.sha256(model).hexdigest(),
             "size": len(model), "license": "test licence", "preprocessing": None, "metrics": None,
             "description": "test"}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"schema": 1, "entries": [entry]}))
    monkeypatch.setenv("DEEPSCAN_MANIFEST", str(manifest))
    said = []
    assert make_detector("auto", say=said.append).name == "dlib"  # not cached, hub unreachable
    assert "dlib" in said[-1]
    with FakeHub() as hub:
        hub.files[("t/det", "f" * 40, "det.onnx")] = model
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        det = make_detector("scrfd", say=said.append)
        assert det.name == "scrfd" and "test licence" in said[-1]
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert make_detector("auto", manifest=weights.load_manifest()).name == "scrfd"  # from the cache


def test_small_faces_are_found_near_hints_or_at_higher_resolution():
    from PIL import Image

    from . import media

    face = np.asarray(Image.fromarray(media.astronaut()[:300, 100:400]).resize((220, 220)))
    frame = np.full((720, 1280, 3), 70, np.uint8)
    frame[300:520, 800:1020] = face  # a ~100 px face: too small for the 640 px pass
    det = DlibDetector()
    assert det._run(frame, 640) == []
    full = det(frame)  # falls back to the whole frame at 1280
    assert len(full) == 1
    hinted = det(frame, hints=[full[0].box])
    assert len(hinted) == 1 and box_iou(hinted[0].box, full[0].box) > 0.5


def test_a_fast_moving_face_stays_one_track(tmp_path):
    from . import media

    fcs = _detect_video(media.fast_face(tmp_path / "fast.mp4"), clips=6)
    assert len(fcs) >= 5 and {f.track_id for f in fcs} == {0}
    xs = [(f.box[0] + f.box[2]) / 2 for f in fcs]
    assert xs[-1] - xs[0] > 600  # it did cross the frame


def test_tracker_keeps_two_fast_faces_apart():
    t = Tracker()
    a = lambda x, y: Detection((x, y, x + 100, y + 100), 1.0)  # noqa: E731
    assert t.assign([a(0, 0), a(0, 400)]) == [0, 1]
    assert t.assign([a(250, 0), a(250, 400)]) == [0, 1]  # both moved 2.5 sizes: nearest first
    assert t.assign([a(500, 400)]) == [1]
    assert t.assign([a(900, 0)]) == [2]  # track 0 was not in the previous clip: a new face


def test_small_faces_are_found_down_to_40_px(tmp_path):
    from deepscan.video import probe, read_clips

    from . import media

    info = probe(media.small_faces_grid(tmp_path / "grid.mp4", face_px=67))
    frame = next(read_clips(info, [0], 1)).frames[0]
    det = DlibDetector()
    assert det(frame) == []  # the fast stages see nothing at 640 or 1280
    faces = filter_faces(det(frame, deep=True, min_face=24), 24)
    assert len(faces) >= 7 and all(40 < f.size < 110 for f in faces)
