"""The CUDA path: the same answers as the CPU within each precision's rounding, several replicas
on a GPU, workers beside CUDA, training with AMP and an exact-enough resume. Skipped without a GPU
(CI has none); `benchmarks/gpu.sh` runs them on a lent one."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from deepscan.config import config_for_variant
from deepscan.faces import DetectorSpec
from deepscan.scan.plan import ScanInput
from deepscan.model import LDADetector
from deepscan.scan import Runner, ScanSettings, scan

from . import media
from .conftest import tiny_model
from .test_hostile import cli
from .test_train import TINY_ARGS, deepscan

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch sees none)")]

CUDA = torch.device("cuda", 0)
# ||cuda - cpu|| / ||cpu|| of the logits: fp32 runs convolutions in TF32 on the GPU (cuDNN's default),
# bf16 keeps 8 bits of mantissa, fp16 11.
REL_TOL = {torch.float32: 1e-2, torch.bfloat16: 6e-2, torch.float16: 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_full_size_model_on_cuda_agrees_with_the_cpu(dtype):
    cfg = config_for_variant("spatial-temporal")
    torch.manual_seed(0)
    model = LDADetector(cfg).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, cfg.image_size, cfg.image_size, 3), np.uint8)
    frames = rng.integers(0, 255, (2, cfg.clip_len, cfg.lda_size, cfg.lda_size, 3), np.uint8)
    ref = Runner(LDADetector(cfg).eval(), torch.device("cpu"), torch.float32)
    ref.model.load_state_dict(Runner(model, torch.device("cpu"), torch.float32).model.state_dict())
    gpu = ref.replica(CUDA)
    gpu.dtype = dtype
    with torch.inference_mode():
        want, want_maps = ref.forward(ref._to_input(images), ref._to_input(frames))
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            got, got_maps = gpu.forward(gpu._to_input(images), gpu._to_input(frames))
    assert torch.isfinite(got.float()).all()
    assert rel(got, want) < REL_TOL[dtype]
    for k in want_maps:
        assert rel(got_maps[k], want_maps[k]) < REL_TOL[dtype], k
    probs, maps = gpu.score(images, frames)  # the scan's entry point: numpy out, maps in float32
    assert probs.shape == (2,) and np.isfinite(probs).all() and all(v.dtype == np.float32 for v in maps.values())


def frame_scores(records):
    return [f["score"] for r in records for t in r["tracks"] for f in t["frames"]]


@pytest.mark.parametrize("precision,atol", [("fp32", 2e-3), ("auto", 3e-2)])
def test_a_scan_on_cuda_gives_the_cpu_verdicts(media_dir, tiny_ckpt, tmp_path, precision, atol):
    args = [media_dir / "astronaut.mp4", media_dir / "two_faces.mp4", "--weights", tiny_ckpt, "--json",
            "--clips", "4", "--detector", "dlib", "--no-hash"]
    cpu = cli(*args, "--device", "cpu")
    gpu = cli(*args, "--device", "cuda", "--precision", precision, "--heatmaps", tmp_path / "maps")
    assert cpu.returncode == gpu.returncode and cpu.returncode in (0, 1), gpu.stderr
    a = [json.loads(x) for x in cpu.stdout.splitlines()]
    b = [json.loads(x) for x in gpu.stdout.splitlines()]
    assert [r["verdict"] for r in a] == [r["verdict"] for r in b] or precision == "auto"
    np.testing.assert_allclose(frame_scores(b), frame_scores(a), atol=atol)
    assert sorted(p.suffix for p in (tmp_path / "maps").rglob("*.png"))  # heatmaps drawn from CUDA maps


def test_two_replicas_on_a_gpu_share_a_scan_fed_by_worker_processes(media_dir):
    items = [ScanInput(str(media_dir / n), n) for n in ("carphone.mp4", "two_faces.mp4", "astronaut.mp4")]
    settings = ScanSettings(clips=6, batch_size=2, hash_files=False)
    one = scan(items, Runner(tiny_model(), CUDA, torch.float32, batch_size=2), DetectorSpec("dlib"), settings,
               workers=0)
    first = Runner(tiny_model(), CUDA, torch.float32, batch_size=2)
    runners = [first, first.replica(CUDA)]
    used = []
    for r in runners:
        launch = r.launch  # a GPU lane queues batches with launch (and collects them one behind)

        def spy(images, frames, ready=None, launch=launch, r=r):
            used.append(id(r))
            return launch(images, frames, ready=ready)

        r.launch = spy
    two = scan(items, runners, DetectorSpec("dlib"), settings, workers=2)  # forkserver workers, CUDA here
    assert [r["path"] for r in two] == [i.path for i in items]
    assert len(set(used)) == 2
    np.testing.assert_allclose(frame_scores(two), frame_scores(one), atol=2e-3)


def test_training_on_cuda_with_amp_and_loader_workers_resumes(tmp_path):
    data = media.make_dataset(tmp_path / "ffpp", "ffpp", per_split=1)
    common = ["--data", data, "--cache", tmp_path / "cache", "--max-steps", "2", *TINY_ARGS,
              "--device", "cuda", "--workers", "2"]  # the later --workers wins over TINY_ARGS' 0
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = deepscan("train", *common, "--out", straight, "--epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["train_loss"]) for x in rows) and rows[0]["cuda_peak_memory_gb"] > 0
    assert deepscan("train", *common, "--out", split, "--epochs", "1").returncode == 0
    r = deepscan("train", *common, "--out", split, "--epochs", "2", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]

    def weights(p):
        with safe_open(str(p / "last.safetensors"), "pt") as f:
            return {k: f.get_tensor(k).float() for k in f.keys() if k.startswith("model.")}

    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    # cuDNN's backward is not bitwise deterministic: the same up to its reductions' order
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-3, worst


def test_scrfd_shaped_graph_on_the_cuda_provider_beside_torch(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip(f"onnxruntime {onnxruntime.__version__} has no CUDA provider here (install onnxruntime-gpu)")
    from deepscan.faces import ScrfdDetector

    path = media.scrfd_like_onnx(tmp_path / "det.onnx", size=64, face=(16, 8, 48, 56))
    torch.zeros(1, device=CUDA)  # torch's CUDA libraries first, then onnxruntime's session
    det = ScrfdDetector(str(path), det_size=64)
    assert det.session.get_providers()[0] == "CUDAExecutionProvider"
    (found,) = det(np.full((128, 128, 3), 100, np.uint8))
    assert np.allclose(found.box, (32, 16, 96, 112), atol=1e-3) and found.score > 0.89
    assert det(np.zeros((128, 128, 3), np.uint8)) == []


def test_blazeface_on_cuda_equals_the_cpu_batched():
    """The batched detector on the GPU (what device preparation runs) gives the CPU's boxes and
    scores on real faces, in one batch of frames."""
    from deepscan.blazeface import VARIANTS, build, letterbox

    frames = [media.astronaut(), media.astronaut()[:300, 100:400], np.full((200, 300, 3), 90, np.uint8)]
    x = torch.from_numpy(np.stack([letterbox(f, VARIANTS["full"].size)[0] for f in frames]))
    model = build("full")
    with torch.inference_mode():
        want = model(x)
        got = model.to(CUDA)(x.to(CUDA))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.cpu().numpy(), b.numpy(), atol=2e-3)
    assert float(want[2][0].max()) > 0.8 and float(want[2][2].max()) < 0.5


def test_nvdec_decodes_what_ffmpeg_decodes(tmp_path):
    """PyNvVideoCodec (the nvdec extra), where the driver exposes NVDEC: same frames as ffmpeg's
    rgb24, within the colour conversion's rounding."""
    nvc = pytest.importorskip("PyNvVideoCodec", reason="PyNvVideoCodec is not installed (pip install deepscan[nvdec])")
    import ctypes

    try:
        ctypes.CDLL("libnvcuvid.so.1")
    except OSError:
        pytest.skip("the driver has no libnvcuvid.so.1 (NVDEC not exposed)")
    from deepscan.video import probe, read_clips

    path = media.face_video(tmp_path / "a.mp4", frames=30)
    info = probe(path)
    dec = nvc.SimpleDecoder(str(path), gpu_id=0, use_device_memory=True, output_color_type=nvc.OutputColorType.RGB)
    assert len(dec) == 30
    for clip in read_clips(info, [0, 17], 1):
        frame = torch.from_dlpack(dec.get_batch_frames_by_index([clip.frame_indices[0]])[0]).cpu().numpy()
        diff = np.abs(frame.reshape(clip.frames[0].shape).astype(int) - clip.frames[0].astype(int))
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8, (diff.mean(), diff.max())


def test_a_scan_prepared_on_the_gpu_equals_the_workers_scan_on_the_gpu(media_dir):
    """--preparation device on CUDA: BlazeFace, tracking and crops on the GPU give the records the
    workers' preparation gives (the same model, on the same GPU, in fp32): same tracks and boxes,
    scores within the GPU's fp32 arithmetic."""
    from deepscan.faces import resolve_detector

    items = [ScanInput(str(media_dir / n), n) for n in ("carphone.mp4", "two_faces.mp4", "astronaut.mp4",
                                                          "no_face.mp4", "rotated.mp4")]
    spec = resolve_detector("blazeface")
    runs = {}
    for prep in ("workers", "device"):
        settings = ScanSettings(clips=6, batch_size=4, hash_files=False, preparation=prep)
        runs[prep] = scan(items, Runner(tiny_model(), CUDA, torch.float32, batch_size=4), spec, settings, workers=1)
    for w, d in zip(runs["workers"], runs["device"]):
        assert (d["verdict"], d["sampling"]) == (w["verdict"], w["sampling"]), d["path"]
        boxes = [[f["box"] for f in t["frames"]] for t in d["tracks"]]
        want = [[f["box"] for f in t["frames"]] for t in w["tracks"]]
        assert len(boxes) == len(want)
        for a, b in zip(boxes, want):  # torch on CUDA vs onnxruntime on the CPU: a rounding apart at most
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1.0)
    np.testing.assert_allclose(frame_scores(runs["device"]), frame_scores(runs["workers"]), atol=2e-3)


def test_a_scan_decoded_by_nvdec_equals_the_ffmpeg_decoded_scan(media_dir):
    """--decoder nvdec on the GPU, where the driver has NVDEC and PyNvVideoCodec is installed:
    the same tracks as ffmpeg-decoded frames, scores within the colour conversion's effect."""
    from deepscan.faces import resolve_detector
    from deepscan.scan.nvdec import available

    why = available(CUDA)
    if why:
        pytest.skip(why)
    items = [ScanInput(str(media_dir / n), n) for n in ("two_faces.mp4", "astronaut.mp4", "no_face.mp4")]
    spec = resolve_detector("blazeface")
    runs = {}
    for decoder in ("ffmpeg", "nvdec"):
        settings = ScanSettings(clips=6, batch_size=4, hash_files=False, preparation="device", decoder=decoder)
        runs[decoder] = scan(items, Runner(tiny_model(), CUDA, torch.float32, batch_size=4), spec, settings, workers=1)
    assert [r["sampling"]["strategy"] for r in runs["nvdec"]] == ["nvdec"] * 3
    for a, b in zip(runs["ffmpeg"], runs["nvdec"]):
        assert (a["verdict"], a["sampling"]["face_clips"]) == (b["verdict"], b["sampling"]["face_clips"]), a["path"]
    np.testing.assert_allclose(frame_scores(runs["nvdec"]), frame_scores(runs["ffmpeg"]), atol=2e-2)


def test_device_crops_and_letterbox_on_cuda_equal_pils_to_the_bit():
    """The split-fp32 products (scan.resample) are exact on the GPU too, TF32 or not."""
    from PIL import Image

    from deepscan.blazeface import letterbox
    from deepscan.faces import crop_square
    from deepscan.scan.device import crop_batch, letterbox_many

    face = media.astronaut()
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            for h, w in [(720, 1280), (1080, 1920), (333, 517)]:
                frame = np.asarray(Image.fromarray(face).resize((w, h)))
                got = letterbox_many([torch.from_numpy(frame).to(CUDA)], 128)[0].cpu().numpy()
                assert np.array_equal(got, letterbox(frame, 128)[0])
            square = np.asarray(Image.fromarray(face).resize((300, 300)))
            clip = torch.from_numpy(square[None].copy()).to(CUDA)
            for x1, size in [(0, 224), (-40, 398), (60, 224)]:
                box = (x1, -20, x1 + 250, 230)
                images, frames = crop_batch([clip], [(0, box)], size, size)
                want = crop_square(square, box, size)
                assert np.array_equal(images[0].cpu().numpy(), want) and np.array_equal(frames[0, 0].cpu().numpy(), want)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False


def test_a_device_step_on_cuda_synchronises_only_to_fetch_detections(media_dir):
    """torch's sync debug mode over device steps: the host waits only for the detections' copies
    (one per round, ``fetches``), nowhere else (no nonzero, masks, .item() or pageable copies)."""
    import warnings

    from deepscan.scan.device import DevicePreparer, RawClip
    from deepscan.video import plan_clips, probe, read_clips

    prep = DevicePreparer(CUDA)
    prep.warm()
    clips = []
    for name in ("two_faces.mp4", "astronaut.mp4", "carphone.mp4"):
        info = probe(media_dir / name)
        clips.append(list(read_clips(info, plan_clips(info.num_frames, 3, 3), 3)))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            before = prep.fetches
            for k in range(3):
                raws = [RawClip(v, c[k].index, c[k].frame_indices, c[k].times,
                                torch.from_numpy(c[k].frames).pin_memory().to(CUDA, non_blocking=True))
                        for v, c in enumerate(clips)]
                prep.step(raws)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert 0 < len(syncs) <= prep.fetches - before, [f"{w.filename}:{w.lineno}" for w in syncs]


def test_each_gpu_runner_prepares_what_it_scores(media_dir):
    """--preparation device with two runners (two GPUs when there are, else two replicas on one):
    a preparer per runner, each with videos of its own; the records equal a one-runner scan's."""
    from deepscan.faces import resolve_detector
    from deepscan.scan.pipeline import Scanner

    items = [ScanInput(str(media_dir / n), n) for n in ("carphone.mp4", "two_faces.mp4", "astronaut.mp4", "no_face.mp4")]
    spec = resolve_detector("blazeface")
    settings = ScanSettings(clips=4, batch_size=4, hash_files=False, preparation="device")
    one = scan(items, Runner(tiny_model(), CUDA, torch.float32, batch_size=4), spec, settings, workers=1)
    second = torch.device("cuda", 1) if torch.cuda.device_count() > 1 else CUDA
    first = Runner(tiny_model(), CUDA, torch.float32, batch_size=4)
    records = []
    with Scanner([first, first.replica(second)], spec.build, spec.name, settings, workers=1) as scanner:
        scanner.run(items, lambda record, row: records.append(record))
        assert all(sum(p.frames_per_step.values()) > 0 for p in scanner.device_preps)
    assert [r["verdict"] for r in records] == [r["verdict"] for r in one]
    np.testing.assert_allclose(frame_scores(records), frame_scores(one), atol=2e-3)
