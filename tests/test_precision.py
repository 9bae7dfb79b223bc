"""The CPU fast path (channels_last + bf16 autocast) must score like fp32 on real face crops."""

import threading

import numpy as np
import pytest
import torch

from deepscan.config import config_for_variant
from deepscan.faces import DlibDetector, FaceClip, face_clips
from deepscan.model import LDADetector, input_normaliser
from deepscan.scan import Runner, cpu_has_bf16, pick_precision
from deepscan.video import plan_clips, probe, read_clips

from .conftest import tiny_config, tiny_model


@pytest.fixture(scope="module")
def real_clips(media_dir):
    det, out = DlibDetector(), []
    for name in ("carphone.mp4", "astronaut.mp4", "two_faces.mp4"):
        info = probe(media_dir / name)
        for clip in read_clips(info, plan_clips(info.num_frames, 2, 3), 3):
            dets = det(clip.frames[0])
            out += face_clips(name, clip, dets, list(range(len(dets))), 398, 224)
    return out[:8]


def calibrated_model(variant, clips):
    """An untrained network made to behave like a trained one where precision matters.

    Random weights score ~0.502 for everything: logits differ only by tiny amounts, and any
    rounding dominates them. So: batch-norm statistics from the real crops, and a head that reads
    the pooled features' main direction of variation, scaled to spread scores over (0, 1), as
    a trained classifier reads a strong feature.
    """
    torch.manual_seed(0)
    model = LDADetector(config_for_variant(variant))
    to_input = input_normaliser(model.config, torch.device("cpu"))
    image = to_input(np.stack([c.image for c in clips]))
    frames = to_input(np.stack([c.frames for c in clips]))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the one batch
    pooled = []
    with torch.no_grad():
        model.train()
        model(image, frames)
        model.eval()
        hook = model.backbone.global_pool.register_forward_hook(lambda m, i, o: pooled.append(o.flatten(1)))
        model(image, frames)
        hook.remove()
        f = pooled[0]
        direction = torch.linalg.svd(f - f.mean(0), full_matrices=False)[2][0]
        scale = 2.0 / float(((f - f.mean(0)) @ direction).std())
        model.backbone.fc.weight.zero_()
        model.backbone.fc.weight[1] = direction * scale
        model.backbone.fc.bias.fill_(-float(f.mean(0) @ direction) * scale)
    return model


def test_auto_precision_choice():
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert pick_precision("fp32", cpu) == torch.float32


# bf16 keeps 8 bits of mantissa: on a head as steep as a trained one's, a frame score moves by up
# to ~0.01 (0.0105 measured on an AMD EPYC with AVX-512 BF16, torch 2.14.1, 2026-12-01). 0.02 is
# the bf16 tolerance the project holds every backend to (a wrong layout or precision moves scores
# by far more).
BF16_TOLERANCE = 0.02


@pytest.mark.parametrize("variant", ["xception", "spatial-temporal"])
def test_bf16_fast_path_scores_within_tolerance_of_fp32(real_clips, variant):
    model = calibrated_model(variant, real_clips)
    ref, _ = Runner(model, torch.device("cpu"), torch.float32)(real_clips)
    fast, maps = Runner(model, torch.device("cpu"), torch.bfloat16)(real_clips)
    assert np.ptp(ref) > 0.3, f"scores do not spread: {ref}"
    assert np.abs(fast - ref).max() < BF16_TOLERANCE, (ref, fast)
    if variant != "xception":
        assert maps["spatial"].dtype == np.float32 and maps["spatial"].shape == (len(real_clips), 4, 14, 14)


def random_clips(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    return [FaceClip("v.mp4", 0, i, (i, i + 1, i + 2), (0.0, 0.04, 0.08), (0, 0, 10, 10), (0, 0, 10, 10), 1.0, None,
                     rng.integers(0, 256, (cfg.image_size, cfg.image_size, 3), np.uint8),
                     rng.integers(0, 256, (cfg.clip_len, cfg.lda_size, cfg.lda_size, 3), np.uint8))
            for i in range(n)]


def test_compiled_runner_scores_like_eager_with_one_graph_for_partial_batches():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    clips = random_clips(tiny_config(), 5)
    ref, ref_maps = Runner(tiny_model(), torch.device("cpu"), torch.float32)(clips)
    notes = []
    runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, use_compile=True, batch_size=4, say=notes.append)
    out = {}
    lanes = [threading.Thread(target=lambda k, part: out.__setitem__(k, runner(part)), args=(k, part))
             for k, part in enumerate([clips[:4], clips[4:]])]  # two lanes call first at once: one compiles
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    (full, maps), (part, part_maps) = out[0], out[1]  # the partial batch is padded to 4: the same graph
    assert runner.compiled and not notes
    np.testing.assert_allclose(np.concatenate([full, part]), ref, atol=1e-4)
    assert part_maps["temporal"].shape == (1, *ref_maps["temporal"].shape[1:])
    np.testing.assert_allclose(np.concatenate([maps["spatial"], part_maps["spatial"]]), ref_maps["spatial"], atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_failure_falls_back_to_eager_with_a_note(monkeypatch):
    import deepscan.scan.score as scan_mod

    def broken(model, device):
        def forward(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler found\nlong details")
        return forward

    monkeypatch.setattr(scan_mod, "compile_model", broken)
    clips = random_clips(tiny_config(), 3)
    ref, _ = Runner(tiny_model(), torch.device("cpu"), torch.float32)(clips)
    notes = []
    runner = Runner(tiny_model(), torch.device("cpu"), torch.float32, use_compile=True, batch_size=4, say=notes.append)
    got, _ = runner(clips)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert not runner.compiled
    assert notes == ["note: --compile failed (RuntimeError: InductorError: no working C++ compiler found); running uncompiled"]
