"""Detection and crops in torch, batched (the GPU preparation's building blocks), on the CPU here:
the same faces as the workers' onnxruntime detector, crops like PIL's, and the model's scores on
them within the bf16 tolerance of the CPU crops' scores."""

import copy

import numpy as np
import pytest
import torch

from deepscan.device_prep import DevicePreparer
from deepscan.faces import box_iou, crop_box, face_clips, resolve_detector
from deepscan.scan import Runner
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


def test_frames_of_several_videos_in_one_batch_find_the_workers_faces(prep, media_dir):
    clips = clips_of(media_dir, ["carphone.mp4", "astronaut.mp4", "two_faces.mp4", "no_face.mp4"], n=1)
    frames = [c.frames[0] for c in clips]  # 176x144, 640x360 ...: sizes differ within the batch
    got = prep.detect([torch.from_numpy(f) for f in frames])
    workers = resolve_detector("blazeface").build()
    want = [workers.run(f, [(0, 0, max(f.shape[:2]))]) or workers.run(f, [(0, 0, max(f.shape[:2]))], near=True)
            for f in frames]
    assert [len(d) for d in got] == [len(d) for d in want] and sum(map(len, got)) >= 6
    for a, b in zip(got, want):
        for da in a:
            assert max(box_iou(da.box, db.box) for db in b) > 0.8  # letterbox resampling differs slightly


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
        diff = np.abs(got.numpy().astype(int) - want)
        assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())  # PIL's filters; rounding (max 2 measured)


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
