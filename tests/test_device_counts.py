"""The device step's work is counted, not timed (issue 32, item 6): the torch operations of a step
stay the same as its faces go from 8 to 64 (batched products, not a loop per face), and a step
does none of the operations that make a GPU wait for the host (``nonzero``, boolean masks,
``.item()``...): its only host synchronisations are its copies of detections, one per detection
round. Counted on the CPU with a dispatch mode, which sees every operation whatever the device."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepscan.faces import Detection
from deepscan.scan.device import DevicePreparer, RawClip

from .test_device_prep import clips_of

# operations that copy a result to the host (or decide a shape from data) on a GPU
SYNCING = {"nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique2", "unique_consecutive",
           "is_nonzero", "equal", "item", "masked_scatter"}


class Ops(TorchDispatchMode):
    """Counts every aten operation that does work (``ops``; views, which launch no kernel, apart
    in ``views``), and those that would synchronise a GPU with the host (``syncing``)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views: Counter = Counter()
        self.syncing: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        (self.views if func.is_view else self.ops)[name] += 1
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
            if i is not None)
        if name in SYNCING or boolean_index:
            self.syncing[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def prep():
    return DevicePreparer("cpu", image_size=62, lda_size=32)


def faces_in(rng, count: int, h: int, w: int) -> list[Detection]:
    out = []
    for _ in range(count):
        side = float(rng.integers(24, 160))
        x, y = float(rng.integers(-20, w - 10)), float(rng.integers(-20, h - 10))  # some leave the frame
        out.append(Detection((x, y, x + side, y + side), 0.9, ((x + side / 3, y + side / 3),) * 6))
    return out


def step_ops(prep, faces_per_clip: int, seed: int) -> tuple[Ops, list]:
    """A step of 8 clips (two frames of 360x640 each) whose detector finds ``faces_per_clip``
    faces in each (a stand-in search: the detection rounds are counted apart, below)."""
    rng = np.random.default_rng(seed)
    clips = [RawClip(k, 1, (0, 1), (0.0, 0.04), torch.from_numpy(rng.integers(0, 256, (2, 360, 640, 3), np.uint8)))
             for k in range(8)]
    found = [faces_in(rng, faces_per_clip, 360, 640) for _ in clips]
    prep.search = lambda items, later=(): found
    try:
        with Ops() as ops:
            out = prep.step(clips)
    finally:
        del prep.search
        prep.trackers.clear()
    return ops, out


def test_a_step_runs_the_same_operations_for_8_faces_as_for_64(prep):
    few, few_out = step_ops(prep, 1, seed=0)
    many, many_out = step_ops(prep, 8, seed=1)
    assert sum(map(len, few_out)) == 8 and sum(map(len, many_out)) == 64
    assert many.ops == few.ops, (many.ops - few.ops) + (few.ops - many.ops)
    assert sum(few.ops.values()) < 250  # ~200: elementwise ops build the 4 weight matrices; 8 products
    assert not few.syncing and not many.syncing, (few.syncing, many.syncing)
    clip = many_out[3][5]
    assert clip.image.shape == (62, 62, 3) and clip.frames.shape == (2, 32, 32, 3)


def test_a_detection_round_is_the_same_operations_and_one_copy_for_8_views_as_for_64(prep):
    rng = np.random.default_rng(2)
    frames = [torch.from_numpy(rng.integers(0, 256, (360, 640, 3), np.uint8)) for _ in range(8)]

    def round_of(views_per_frame: int) -> tuple[Ops, int]:
        asks = []
        for f in frames:
            views = [(int(rng.integers(0, 500)), int(rng.integers(0, 250)), int(rng.integers(40, 300)))
                     for _ in range(views_per_frame)]
            asks.append((f, views, bool(rng.integers(0, 2))))
        before = prep.fetches
        with Ops() as ops:
            prep.run_views(asks)
        return ops, prep.fetches - before

    (few, few_fetches), (many, many_fetches) = round_of(1), round_of(8)
    assert few.ops == many.ops, (many.ops - few.ops) + (few.ops - many.ops)
    assert few_fetches == many_fetches == 1  # one copy to the host a round, whatever the views
    assert not few.syncing and not many.syncing


def test_a_real_step_synchronises_once_per_detection_round_and_nowhere_else(media_dir):
    prep = DevicePreparer("cpu")
    clips = clips_of(media_dir, ["two_faces.mp4", "astronaut.mp4", "carphone.mp4"], count=3)
    rounds = 0
    run_views = prep.run_views

    def counted(asks):
        nonlocal rounds
        rounds += 1
        return run_views(asks)

    prep.run_views = counted
    found = 0
    for index in range(3):  # clip 0 searches deep (tiles), later ones follow the tracked faces
        raws = [RawClip(name, c.index, c.frame_indices, c.times, torch.from_numpy(c.frames))
                for name, c in enumerate(clips[index::3])]
        with Ops() as ops:
            out = prep.step(raws)
        found += sum(map(len, out))
        assert not ops.syncing, ops.syncing
    assert found >= 9 and 3 <= rounds <= 3 * 5
    assert prep.fetches == rounds and prep.refetches == 0


def test_a_whole_frame_pass_found_ahead_gives_the_same_faces_in_fewer_rounds(media_dir):
    """A waiting clip that searches the whole frame first (every FULL_EVERY-th) has that pass run
    in an earlier step's first round; when its turn comes the answer is used, not run again: the
    same faces and crops as without, and its step has one round less."""
    per_video = [clips_of(media_dir, [name], count=5, n=2) for name in ("two_faces.mp4", "astronaut.mp4")]

    def scan_clips(ahead: bool):
        prep = DevicePreparer("cpu", image_size=62, lda_size=32)
        out, fetches = [], []
        for index in range(5):
            raws = [RawClip(v, index, c[index].frame_indices, c[index].times, torch.from_numpy(c[index].frames))
                    for v, c in enumerate(per_video)]
            later = [(v, 4, torch.from_numpy(c[4].frames[0])) for v, c in enumerate(per_video)] if ahead and index == 1 else []
            before = prep.fetches
            out.append(prep.step(raws, later))
            fetches.append(prep.fetches - before)
        return prep, out, fetches

    (a, got, a_rounds), (b, want, b_rounds) = scan_clips(True), scan_clips(False)
    assert (a.looked_ahead, a.used_ahead, a.ahead) == (2, 2, {}) and b.used_ahead == 0
    assert a_rounds[1] == b_rounds[1] and a_rounds[4] == b_rounds[4] - 1, (a_rounds, b_rounds)
    faces = [(f.key, f.clip_index, f.track_id, f.box) for step in got for clip in step for f in clip]
    assert faces == [(f.key, f.clip_index, f.track_id, f.box) for step in want for clip in step for f in clip]
    assert len(faces) >= 10
    for x, y in zip((f for s in got for c in s for f in c), (f for s in want for c in s for f in c)):
        assert torch.equal(x.image, y.image) and torch.equal(x.frames, y.frames)
