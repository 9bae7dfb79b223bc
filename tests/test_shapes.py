"""Fixed shapes (issue 32, item 1): at fixed shapes the model's convolutions see only the few
batch sizes of ``batch_shapes``, each run first by the warm-up in the lane thread that later runs
it. Counted on CPU (fixed shapes forced; on CUDA they are the default), through the scan's own
lanes, over batches of random sizes such as the Batcher makes (1 to --batch-size clips)."""

import random

import numpy as np
import torch

from deepscan.scan.lanes import score_in_lanes
from deepscan.scan.score import Runner, batch_shapes, shape_for

from .conftest import tiny_model


def test_batch_shapes_are_few_and_hold_every_batch():
    assert batch_shapes(64) == (8, 16, 32, 64)
    assert batch_shapes(8) == (1, 2, 4, 8)
    assert batch_shapes(1) == (1,)
    assert batch_shapes(100) == (13, 25, 50, 100)
    for size in (1, 7, 8, 64, 100, 128):
        shapes = batch_shapes(size)
        assert len(shapes) <= 4
        assert all(shape_for(n, shapes) >= n and shape_for(n, shapes) in shapes for n in range(1, size + 1))


def test_convolutions_see_only_warmed_shapes_in_the_thread_that_warmed_them():
    model = tiny_model()
    runner = Runner(model, torch.device("cpu"), torch.float32, batch_size=8, fixed_shapes=True)
    runner.threads = 2  # two CPU lanes on one runner: each warms in its own thread
    seen: list[tuple[str, int]] = []
    import threading

    def record(module, inputs):
        seen.append((threading.current_thread().name, inputs[0].shape[0]))

    hooks = [m.register_forward_pre_hook(record) for m in runner.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert hooks
    cfg = runner.cfg
    rng = random.Random(0)
    batches = []
    for _ in range(12):
        n = rng.randint(1, 8)
        batches.append((np.random.randint(0, 255, (n, cfg.image_size, cfg.image_size, 3), np.uint8),
                        np.random.randint(0, 255, (n, cfg.clip_len, cfg.lda_size, cfg.lda_size, 3), np.uint8)))
    score_in_lanes([runner], batches)
    for h in hooks:
        h.remove()
    lanes = {name for name, _ in runner.warmed}
    assert len(lanes) == 2  # both lanes warmed, each in its own thread
    assert {size for _, size in seen} <= set(runner.shapes) == {1, 2, 4, 8}
    # every (thread, batch) a convolution saw was warmed by that thread (the warm-up's own runs included)
    assert set(seen) <= runner.warmed
    assert runner.shapes_run <= runner.warmed and runner.warmed == {(t, s) for t in lanes for s in runner.shapes}


def test_padded_scores_equal_unpadded_ones():
    model = tiny_model()
    fixed = Runner(model, torch.device("cpu"), torch.float32, batch_size=8, fixed_shapes=True)
    cfg = fixed.cfg
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (3, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    frames = rng.integers(0, 255, (3, cfg.clip_len, cfg.lda_size, cfg.lda_size, 3), dtype=np.uint8)
    probs, maps = fixed.score_batch(images, frames)
    assert probs.shape == (3,) and all(len(m) == 3 for m in maps.values())
    one = [fixed.score(images[k:k + 1], frames[k:k + 1])[0][0] for k in range(3)]  # padded to 1: no padding
    np.testing.assert_allclose(probs, one, atol=1e-5)
