"""The CUDA proof in one call, for a lent GPU machine with little time: each stage runs in its own
process under a time limit and leaves what it measured so far, so a stage that hangs or fails costs
only itself. Writes ``gpu-result.json`` (and the stages' logs, one file) to --out.

Stages, in order of importance: env (versions, GPU, providers), nvdec (the driver's libnvcuvid,
PyNvVideoCodec, a 720p decode: frames/s alone and in threads, colours against ffmpeg), blazeface
(the batched detector on CUDA: frames/s at batch 64 and 256, boxes against the CPU's), device_prep
(deepscan.scan.device: detection and crops of 64 clips on the device, against PIL's crops), model (clips/s per variant and
precision, a batch sweep, cudnn.benchmark), tests (the CUDA-marked tests), prep (preparation
workers 1..cores, model off), folder (a folder scan on the GPU against the model alone, with the
per-stage breakdown of one video), train (a full-size training run with AMP and loader workers on a
generated FF++-shaped set, and a resumed run against a straight one), compile (torch.compile).

    python benchmarks/gpu.py --out OUTDIR [--budget 440] [--stages env,tests,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {  # name: the most seconds it may take; in order of importance
    # the default stages' limits add up to 8 minutes (480 s): issue 22 asks that they fit
    "env": 20, "syncs": 40, "folder": 150, "host": 40, "shapes": 45, "nvdec": 35, "tests": 90, "device_prep": 40,
    "blazeface": 40, "prep": 60,
    "model": 120, "train": 150,
    "compile": 150,
    # follow-ups, run by name (--stages): steady-state training, wider preparation, workers vs cores
    "train_steady": 120, "prep_wide": 100, "folder_workers": 90, "folder_profile": 120,
}
# 2026-12-01: what the device-preparation issue needs first: is NVDEC there, then the folder and
# one video prepared on the device (issue 22's figures), the CUDA tests (device preparation and
# NVDEC against the workers and ffmpeg), then the building blocks, preparation, the model
# 2026-12-07 (issue 32): fixed shapes first; prep (measured 2026-12-04) by name, to stay in 8 minutes
# 2026-12-07 (issue 32, the device stage): syncs and host join; nvdec, device_prep, blazeface by name
DEFAULT = "env,syncs,folder,host,shapes,nvdec,tests"  # model: measured on 2026-11-26, by name
BATCH = 128
CLIPS = 32
# --smoke: the same stages on the CPU at toy sizes, to find a script's mistakes before device time
SMOKE = os.environ.get("DEEPSCAN_GPU_SMOKE") == "1"
if SMOKE:
    BATCH, CLIPS = 2, 2


def _dev():
    import torch

    return torch.device("cpu") if SMOKE else torch.device("cuda", 0)


def _sync() -> None:
    import torch

    if not SMOKE:
        torch.cuda.synchronize()


def _peak_gb(reset: bool = False):
    import torch

    if SMOKE:
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


# ---------------------------------------------------------------------------- stages
def stage_env(part: dict, work: Path) -> None:
    import onnxruntime
    import torch

    from deepscan.video import ffmpeg_exe

    ffmpeg = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    part.update(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), cores=os.cpu_count(), onnxruntime=onnxruntime.__version__,
                providers=onnxruntime.get_available_providers(), ffmpeg=ffmpeg, smoke=SMOKE)
    if not SMOKE:
        p = torch.cuda.get_device_properties(0)
        part.update(device_name=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    memory_gb=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported())
    import dlib  # the offline detector must import there

    part["dlib"] = getattr(dlib, "__version__", "?")


def stage_nvdec(part: dict, work: Path) -> None:
    """NVDEC, step by step, each step recorded before the next: the driver's libnvcuvid.so.1,
    PyNvVideoCodec's import, one 720p H.264 decode (all frames; the 96 frames a 32-clip scan
    reads, by index), decoders in threads over copies, and the RGB it gives against ffmpeg's."""
    import ctypes

    try:
        ctypes.CDLL("libnvcuvid.so.1")
        part["libnvcuvid"] = "found"
    except OSError as exc:
        part["libnvcuvid"] = f"missing ({exc})"
    _save(part, work, "nvdec")
    import numpy as np
    import torch

    import PyNvVideoCodec as nvc

    from deepscan.video import plan_clips, probe, read_clips

    part["pynvvideocodec"] = getattr(nvc, "__version__", "?")
    _save(part, work, "nvdec")
    src, _, folder = _videos(work, 16)

    def decoder(path):
        return nvc.SimpleDecoder(str(path), gpu_id=0, use_device_memory=True, output_color_type=nvc.OutputColorType.RGB)

    t = time.perf_counter()
    dec = decoder(src)
    part["open_s"] = round(time.perf_counter() - t, 3)
    n = len(dec)
    for name, idx in (("all", list(range(n))), ("scan_96", sorted({s + k for s in plan_clips(n, 32, 3) for k in range(3)}))):
        dec = decoder(src)
        torch.cuda.synchronize()
        t = time.perf_counter()
        frames = [torch.from_dlpack(f) for f in dec.get_batch_frames_by_index(idx)]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        part[f"{name}_frames_per_s"] = round(len(idx) / dt, 1)
        part[f"{name}_frame"] = [list(frames[0].shape), str(frames[0].dtype), str(frames[0].device)]
        print(json.dumps(part), flush=True)
        _save(part, work, "nvdec")
    info = probe(src)
    diffs = []
    dec = decoder(src)  # kept alive: its frame buffers are freed with it (2026-12-04's crash)
    for clip in read_clips(info, [0, n // 3, 2 * n // 3], 1):
        i = clip.frame_indices[0]
        nv = torch.from_dlpack(dec.get_batch_frames_by_index([i])[0]).cpu().numpy().reshape(clip.frames[0].shape)
        d = np.abs(nv.astype(np.int16) - clip.frames[0].astype(np.int16))
        diffs.append({"frame": i, "mean_abs": round(float(d.mean()), 3), "p99_abs": float(np.percentile(d, 99)),
                      "max_abs": int(d.max())})
    del dec
    part["colour_vs_ffmpeg"] = diffs
    _save(part, work, "nvdec")
    from concurrent.futures import ThreadPoolExecutor

    def whole(path):
        d = decoder(path)
        return len([torch.from_dlpack(f) for f in d.get_batch_frames_by_index(list(range(len(d))))])

    rows = part.setdefault("threads", [])
    for threads in (1, 4, 8):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            count = sum(pool.map(whole, folder[:max(threads, 8)]))
        torch.cuda.synchronize()
        rows.append({"threads": threads, "videos": max(threads, 8), "frames_per_s": round(count / (time.perf_counter() - t), 1)})
        print(json.dumps(rows[-1]), flush=True)
        _save(part, work, "nvdec")


def stage_host(part: dict, work: Path) -> None:
    """The model's host path (issue 32, item 7): host<->device GB/s from pinned and pageable memory;
    the model alone through ``model_throughput`` and through the scan's lanes at the same batch;
    and one batch's phases (stack, pin, copy in, forward, copy out), each timed on its own."""
    import numpy as np
    import torch

    from deepscan.perf import model_throughput
    from deepscan.scan.lanes import score_in_lanes

    dev = _dev()
    size = (64 if SMOKE else 1024) << 20
    rows = part.setdefault("copy_gb_per_s", {})
    for pinned in (True, False):
        host = torch.empty(size, dtype=torch.uint8, pin_memory=pinned and not SMOKE)
        on = torch.empty(size, dtype=torch.uint8, device=dev)
        for name, fn in (("h2d", lambda: on.copy_(host, non_blocking=True)), ("d2h", lambda: host.copy_(on, non_blocking=True))):
            fn()
            _sync()
            t = time.perf_counter()
            for _ in range(3):
                fn()
            _sync()
            rows[f"{name}_{'pinned' if pinned else 'pageable'}"] = round(3 * size / (time.perf_counter() - t) / 1e9, 2)
        print(json.dumps(rows), flush=True)
        _save(part, work, "host")
    runner = _runner()
    cfg = runner.cfg
    part["model_throughput"] = model_throughput("spatial-temporal", "fp32" if SMOKE else "bf16", dev, BATCH,
                                                iters=1 if SMOKE else 10)
    _save(part, work, "host")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, cfg.image_size, cfg.image_size, 3), np.uint8)
    frames = rng.integers(0, 256, (BATCH, cfg.clip_len, cfg.lda_size, cfg.lda_size, 3), np.uint8)
    batches = 2 if SMOKE else 20
    score_in_lanes([runner], [(images, frames)] * 2)  # warm (each lane warms its shapes first)
    t = time.perf_counter()
    score_in_lanes([runner], [(images, frames)] * batches)
    lanes = BATCH * batches / (time.perf_counter() - t)
    part["lanes_clips_per_s"] = round(lanes, 1)
    ref = part["model_throughput"].get("clips_per_s") if isinstance(part["model_throughput"], dict) else None
    if ref:
        part["lanes_vs_model_throughput"] = round(lanes / ref, 3)
    _save(part, work, "host")
    phases = {}
    crops = [(images[k], frames[k]) for k in range(BATCH)]
    with runner.lane():
        runner.score(images, frames)
        for _ in range(3):
            t = time.perf_counter()
            im, fr = np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])
            phases.setdefault("stack_s", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            pim, pfr = runner._stage(im), runner._stage(fr)
            phases.setdefault("pin_s", []).append(time.perf_counter() - t)
            _sync()
            t = time.perf_counter()
            xi, xf = runner._to_input(pim), runner._to_input(pfr)
            _sync()
            phases.setdefault("copy_in_s", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            logits, maps = runner.forward(xi, xf)
            _sync()
            phases.setdefault("forward_s", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            logits.float().cpu()
            [v.float().cpu() for v in maps.values()]
            phases.setdefault("copy_out_s", []).append(time.perf_counter() - t)
    part["phases_batch"] = BATCH
    part["phases_s"] = {k: round(min(v), 5) for k, v in phases.items()}
    print(json.dumps(part), flush=True)


def stage_syncs(part: dict, work: Path) -> None:
    """A short folder scan prepared on the device under ``torch.cuda.set_sync_debug_mode("warn")``:
    the host synchronisations it makes (counted by their warnings' source lines), the clips a
    device step held, the views each detector call ran (by bucket) and the clips each model
    batch held."""
    import collections
    import warnings

    import torch

    from deepscan.faces import resolve_detector
    from deepscan.scan import ScanSettings, default_workers
    from deepscan.scan.pipeline import Scanner
    from deepscan.scan.plan import ScanInput

    _, _, folder = _videos(work, 2 if SMOKE else 16)
    runner = _runner()
    spec = resolve_detector("blazeface")
    settings = ScanSettings(clips=CLIPS, batch_size=BATCH, hash_files=False, preparation="device")
    records = []
    with Scanner([runner], spec.build, spec.name, settings, workers=default_workers([runner.device])) as scanner:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not SMOKE:
                torch.cuda.set_sync_debug_mode("warn")
            t = time.perf_counter()
            try:
                scanner.run([ScanInput(str(p), p.name) for p in folder], lambda r, row: records.append(r))
            finally:
                if not SMOKE:
                    torch.cuda.set_sync_debug_mode("default")
            seconds = time.perf_counter() - t
        prep = scanner.device_prep
        where = collections.Counter()
        for w in caught:
            if "synchroniz" in str(w.message):
                where[f"{Path(w.filename).name}:{w.lineno}"] += 1
        clips = sum(r["sampling"]["face_clips"] for r in records)
        part.update({"videos": len(records), "face_clips": clips, "seconds": round(seconds, 2),
                     "syncs": sum(where.values()), "syncs_per_clip": round(sum(where.values()) / max(clips, 1), 3),
                     "sync_sites": dict(where.most_common(20)), "fetches": prep.fetches, "refetches": prep.refetches,
                     "clips_per_device_step": dict(sorted(prep.frames_per_step.items())),
                     "detector_calls": {f"{'short' if near else 'full'}@{b}": c for (near, b), c in sorted(prep.calls.items())},
                     "model_batches": dict(sorted((k, v) for k, v in runner.batch_sizes.items() if v))})
    print(json.dumps(part), flush=True)


def stage_blazeface(part: dict, work: Path) -> None:
    """BlazeFace (full range) batched on the device: letterbox (device_prep.letterbox_many, PIL's
    exactly) and network on 720p frames at batch 64 and 256, and its boxes against the CPU ONNX
    form's on the same frames."""
    import numpy as np
    import torch

    from deepscan.blazeface import build
    from deepscan.scan.device import letterbox_many
    from deepscan.faces import resolve_detector
    from deepscan.video import plan_clips, probe, read_clips

    dev = _dev()
    src, _, _ = _videos(work, 1)
    info = probe(src)
    frames = np.stack([c.frames[0] for c in read_clips(info, plan_clips(info.num_frames, 64, 1), 1)])
    model = build("full").to(dev).eval()
    size = model.size
    h, w = frames.shape[1:3]

    def detect(batch_u8):
        return model(letterbox_many(list(batch_u8), size))

    on_dev = torch.from_numpy(frames).to(dev)
    with torch.inference_mode():
        for batch in ((4, 8) if SMOKE else (64, 256)):
            x = on_dev.repeat((batch + 63) // 64, 1, 1, 1)[:batch]
            detect(x)
            _sync()
            t, n = time.perf_counter(), 0
            while time.perf_counter() - t < 3:
                detect(x)
                n += batch
            _sync()
            part.setdefault("rows", []).append({"batch": batch, "frames_per_s": round(n / (time.perf_counter() - t), 1),
                                                "frame": f"{w}x{h}", "precision": "fp32"})
            print(json.dumps(part["rows"][-1]), flush=True)
            _save(part, work, "blazeface")
        boxes, _, scores = detect(on_dev)
        model_dev = model
        model = model.cpu()  # the same letterbox and network on the CPU: the device's own rounding
        ref_boxes, _, _ = detect(torch.from_numpy(frames))
        model = model_dev.to(dev)
    part["box_max_abs_px_vs_cpu_same_letterbox"] = round(float(
        (boxes.cpu() - ref_boxes).abs().max() * max(h, w)), 3)
    cpu = resolve_detector("blazeface").build()  # the workers' form: PIL letterbox, onnxruntime
    diffs = []
    for i, f in enumerate(frames):
        j = int(scores[i].argmax())
        mine = (boxes[i, j].cpu().numpy() * max(h, w)).tolist()
        ref = cpu.run(f, [(0, 0, max(h, w))])
        if ref:
            diffs.append(max(abs(a - b) for a, b in zip(mine, ref[0].box)))
    part["box_max_abs_px_vs_workers"] = round(max(diffs), 2) if diffs else None
    part["frames_compared"] = len(diffs)


def stage_tests(part: dict, work: Path) -> None:
    pick = os.environ.get("DEEPSCAN_GPU_TESTS_K")  # a -k expression: a rerun of some tests only
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", *(["-k", pick] if pick else []),
                        "tests/test_cuda.py", "-p",
                        "no:cacheprovider", "--timeout", "120", f"--basetemp={work / 'pytest'}"],
                       capture_output=True, text=True, cwd=ROOT)
    lines = (r.stdout + r.stderr).strip().splitlines()
    part.update(returncode=r.returncode, summary=lines[-1] if lines else "", tail=lines[-60:])


def _save(part: dict, work: Path, name: str) -> None:
    (work / f"{name}.json").write_text(json.dumps(part))


def stage_model(part: dict, work: Path) -> None:
    import torch

    from deepscan.perf import model_throughput

    dev = _dev()
    rows = part.setdefault("rows", [])

    def row(variant, precision, batch, **note):
        if not SMOKE:
            torch.cuda.empty_cache()
        r = model_throughput(variant, precision, dev, batch, iters=1 if SMOKE else 10)
        rows.append({**r, **note})
        print(json.dumps(rows[-1]), flush=True)
        _save(part, work, "model")

    for variant in ("spatial-temporal",) if SMOKE else ("spatial-temporal", "xception", "spatial", "temporal"):
        for precision in ("bf16", "fp32-nchw") if SMOKE else ("bf16", "fp16", "fp32-nchw"):
            row(variant, precision, BATCH)
    if SMOKE:
        return
    for batch in (32, 64, 256):
        row("spatial-temporal", "bf16", batch)
    torch.backends.cudnn.benchmark = True
    row("spatial-temporal", "bf16", BATCH, cudnn_benchmark=True)
    row("spatial-temporal", "bf16", 256, cudnn_benchmark=True)


def _videos(work: Path, count: int):
    from deepscan.perf import benchmark_inputs, make_folder

    carried = ROOT / ".dev" / "face_720p_10s.mp4"
    if carried.exists() and not (work / "face_720p_10s.mp4").exists():
        shutil.copy(carried, work / "face_720p_10s.mp4")
    src, weights = benchmark_inputs(work, (1280, 720), 10)
    return src, weights, make_folder(src, work / f"folder{count}", count)


def _prep_rows(part: dict, work: Path, name: str, videos: int, counts, detector: str = "dlib") -> None:
    """Preparation clips/s (model off) over ``videos`` generated videos, for each worker count in
    ``counts(cores)``."""
    from deepscan.config import config_for_variant
    from dataclasses import replace

    from deepscan.faces import resolve_detector
    from deepscan.perf import preparation_throughput
    from deepscan.scan import ScanSettings, cpu_count

    _, _, folder = _videos(work, videos)
    prep = ScanSettings(clips=CLIPS, hash_files=False).prep(config_for_variant("spatial-temporal"))
    cores = cpu_count()
    rows = part.setdefault("rows", [])
    spec = replace(resolve_detector(detector), threads=1)
    first = None
    for n in sorted(counts(cores) & set(range(1, cores + 1))):
        rows += preparation_throughput(folder, spec, prep, [n], say=lambda m: None)
        first = first or rows[-1]["clips_per_s"]
        rows[-1]["x_one_worker"] = round(rows[-1]["clips_per_s"] / first, 2)
        print(json.dumps(rows[-1]), flush=True)
        _save(part, work, name)


def stage_device_prep(part: dict, work: Path) -> None:
    """deepscan.scan.device on the device: 64 clips (3 frames of 720p each) already there,
    detection over their first frames in one batch, then the crops for the model (398 and 224 px):
    clips/s of each step, and the crops against the workers' PIL crops."""
    import numpy as np
    import torch

    from deepscan.scan.device import DevicePreparer
    from deepscan.faces import crop_box, face_clips, resolve_detector
    from deepscan.video import plan_clips, probe, read_clips

    dev = _dev()
    src, _, _ = _videos(work, 1)
    info = probe(src)
    clips = list(read_clips(info, plan_clips(info.num_frames, 64, 3), 3))
    prep = DevicePreparer(dev)
    on_dev = torch.from_numpy(np.stack([c.frames for c in clips])).to(dev)
    firsts = [on_dev[i, 0] for i in range(len(clips))]
    dets = prep.detect(firsts)  # warm-up
    _sync()
    t = time.perf_counter()
    for _ in range(3):
        dets = prep.detect(firsts)
    _sync()
    part["detect_clips_per_s"] = round(3 * len(clips) / (time.perf_counter() - t), 1)
    squares = [(i, crop_box(d[0].box)) for i, d in enumerate(dets) if d]
    prep.crops(on_dev, squares[:2], 398, 224)
    _sync()
    t = time.perf_counter()
    images, frames = prep.crops(on_dev, squares, 398, 224)
    _sync()
    part["crop_clips_per_s"] = round(len(squares) / (time.perf_counter() - t), 1)
    part["faces"] = len(squares)
    print(json.dumps(part), flush=True)
    _save(part, work, "device_prep")
    worker = resolve_detector("blazeface").build()
    i = squares[0][0]
    d = worker(clips[i].frames[0])
    if d:
        (ref,) = face_clips("v", clips[i], d[:1], [0], 398, 224)
        got_i, got_f = prep.crops(on_dev, [(i, crop_box(d[0].box))], 398, 224)
        part["crop_max_abs_vs_pil"] = int(max(np.abs(got_i[0].cpu().numpy().astype(int) - ref.image).max(),
                                              np.abs(got_f[0].cpu().numpy().astype(int) - ref.frames).max()))


def stage_prep(part: dict, work: Path) -> None:
    _prep_rows(part, work, "prep", 16, lambda cores: {1, 2, 4, 8, cores - 1, cores}, "blazeface")
    _prep_rows(part, work, "prep", 16, lambda cores: {1, cores}, "dlib")


def _runner():
    """The full-size spatial-temporal model on the device, as a GPU scan runs it (bf16)."""
    import torch

    from deepscan.config import config_for_variant
    from deepscan.model import LDADetector
    from deepscan.scan import Runner

    torch.manual_seed(0)
    return Runner(LDADetector(config_for_variant("spatial-temporal")), _dev(),
                  torch.float32 if SMOKE else torch.bfloat16, batch_size=BATCH)


def stage_shapes(part: dict, work: Path) -> None:
    """Fixed shapes (issue 32): each of the runner's batch shapes cold and warm in a new thread,
    and again in a second new thread (are cuDNN's plans per thread?); the warm-up of all shapes as
    a lane runs it; batches of random sizes at fixed shapes and not, with cudnn.benchmark off and on."""
    import random
    import threading

    import numpy as np
    import torch

    runner = _runner()
    cfg = runner.cfg
    part["shapes"] = list(runner.shapes)

    def batch(n):
        return (np.random.randint(0, 255, (n, cfg.image_size, cfg.image_size, 3), np.uint8),
                np.random.randint(0, 255, (n, cfg.clip_len, cfg.lda_size, cfg.lda_size, 3), np.uint8))

    def in_thread(fn):
        out = {}
        t = threading.Thread(target=lambda: out.update(fn()))
        t.start()
        t.join()
        return out

    def timed(n, times=2):
        images, frames = batch(n)
        out = []
        for _ in range(times):
            t = time.perf_counter()
            runner.score(images, frames)
            _sync()
            out.append(round(time.perf_counter() - t, 4))
        return out

    for thread in ("first", "second"):
        part[f"{thread}_thread"] = in_thread(lambda: {str(n): timed(n) for n in runner.shapes})
        _save(part, work, "shapes")
        print(json.dumps(part[f"{thread}_thread"]), flush=True)

    def warm():
        t = time.perf_counter()
        runner.warm()
        _sync()
        return {"warm_all_s": round(time.perf_counter() - t, 3)}

    part.update(in_thread(warm))
    rng = random.Random(0)
    sizes = [rng.randint(1, BATCH) for _ in range(4 if SMOKE else 24)]
    part["random_sizes"] = sizes
    rows = part.setdefault("random", [])
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        for fixed in (True, False):
            runner.fixed_shapes = fixed

            def run():
                for n in sizes[:2]:  # this thread's first sight of its shapes is not what is compared
                    runner.score(*batch(n))
                _sync()
                t = time.perf_counter()
                for n in sizes:
                    runner.score(*batch(n))
                _sync()
                return {"seconds": round(time.perf_counter() - t, 3)}

            r = in_thread(run)
            rows.append({"fixed_shapes": fixed, "cudnn_benchmark": benchmark, **r,
                         "clips_per_s": round(sum(sizes) / r["seconds"], 1)})
            print(json.dumps(rows[-1]), flush=True)
            _save(part, work, "shapes")
    torch.backends.cudnn.benchmark = False


def stage_folder(part: dict, work: Path) -> None:
    """One video and a folder end to end, prepared on the device (workers only decode) and by the
    workers (BlazeFace in each), side by side: issue 22's figures (throughput.folder,
    throughput.one_video with end_to_end_s_warm)."""
    import traceback

    from deepscan.faces import resolve_detector
    from deepscan.perf import end_to_end, folder_throughput
    from deepscan.scan import default_workers

    src, weights, folder = _videos(work, 4 if SMOKE else 64)
    runner = _runner()
    spec = resolve_detector("blazeface")
    part["detector"] = spec.name
    workers = default_workers([runner.device])
    for prep, one_workers in (("device", 1), ("workers", 1)):
        key = "one_video" if prep == "device" else "one_video_workers"
        try:  # one video is prepared by one worker either way; warm: a second one after it
            part[key] = end_to_end(src, runner, spec, CLIPS, BATCH, one_workers, preparation=prep)
        except Exception as exc:  # noqa: BLE001 - the other preparation is still measured
            part[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
        print(key, json.dumps(part[key]), flush=True)
        _save(part, work, "folder")
    from deepscan.scan.nvdec import available

    part["nvdec_unavailable"] = available(runner.device)  # None: NVDEC works here
    runs = [("device", "ffmpeg"), ("workers", "ffmpeg")] + ([("device", "nvdec")] if part["nvdec_unavailable"] is None
                                                             else [])
    for prep, decoder in runs:
        try:
            row = folder_throughput(folder, runner, spec, weights, CLIPS, BATCH, workers, rss=False, preparation=prep,
                                    decoder=decoder)
        except Exception as exc:  # noqa: BLE001
            row = {"preparation": prep, "decoder": decoder, "error": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
        if (prep, decoder) == ("device", "ffmpeg"):
            part.update(row)
        else:
            part["folder_workers" if prep == "workers" else "folder_nvdec"] = row
        print(prep, decoder, json.dumps(row), flush=True)
        _save(part, work, "folder")
    if part["nvdec_unavailable"] is None:
        try:  # the warm single video with NVDEC: the 1.0 s target's best case
            part["one_video_nvdec"] = end_to_end(src, runner, spec, CLIPS, BATCH, 1, preparation="device",
                                                 decoder="nvdec")
        except Exception as exc:  # noqa: BLE001
            part["one_video_nvdec"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
        _save(part, work, "folder")
    part["precision"] = "bf16"
    if "end_to_end_clips_per_s" not in part:
        raise RuntimeError(f"the folder prepared on the device failed: {part.get('error')}")


def _ffpp_of_copies(src: Path, root: Path) -> Path:
    """FF++'s layout (three pairs, one per split; two methods) whose videos are all ``src``:
    enough for timing training at full size, not for learning anything."""
    ids = [f"{i:03d}" for i in range(6)]
    pairs = [[ids[i], ids[i + 1]] for i in range(0, 6, 2)]
    for name, pair in zip(("train", "val", "test"), pairs):
        (root / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.json").write_text(json.dumps([pair]))
    real = root / "original_sequences" / "youtube" / "c23" / "videos"
    real.mkdir(parents=True, exist_ok=True)
    for i in ids:
        if not (real / f"{i}.mp4").exists():
            os.link(src, real / f"{i}.mp4")
    for method in ("Deepfakes", "FaceSwap"):
        d = root / "manipulated_sequences" / method / "c23" / "videos"
        d.mkdir(parents=True, exist_ok=True)
        for a, b in pairs:
            for name in (f"{a}_{b}.mp4", f"{b}_{a}.mp4"):
                if not (d / name).exists():
                    os.link(src, d / name)
    return root


def _step_rate(dev, batch: int) -> dict:
    """Training steps alone on synthetic batches already on the device (no loader): the ceiling."""
    import torch
    import torch.nn.functional as F

    from deepscan.config import config_for_variant
    from deepscan.model import LDADetector

    tiny = {"image_size": 62, "lda_size": 32} if SMOKE else {}
    cfg = config_for_variant("spatial-temporal", **tiny)
    torch.manual_seed(0)
    model = LDADetector(cfg).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=3e-4, momentum=0.9)
    image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=dev).contiguous(memory_format=torch.channels_last)
    frames = torch.randn(batch, cfg.clip_len, 3, cfg.lda_size, cfg.lda_size, device=dev)
    labels = torch.randint(0, 2, (batch,), device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(image, frames).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync()
    _peak_gb(reset=True)
    t, steps = time.perf_counter(), 2 if SMOKE else 15
    for _ in range(steps):
        step()
    _sync()
    return {"clips_per_s": round(steps * batch / (time.perf_counter() - t), 1), "batch": batch,
            "precision": "bf16", "peak_memory_gb": _peak_gb()}


def stage_train(part: dict, work: Path) -> None:
    import torch

    dev, batch = _dev(), 2 if SMOKE else 32
    part["step_only"] = _step_rate(dev, batch)
    print(json.dumps(part["step_only"]), flush=True)
    _save(part, work, "train")
    if not SMOKE:
        torch.cuda.empty_cache()

    # 2. `deepscan train` itself: prepare (dlib), two epochs, and one epoch + --resume
    src, _, _ = _videos(work, 1)
    data = _ffpp_of_copies(src, work / "ffpp")
    common = [sys.executable, "-m", "deepscan", "train", "--data", str(data), "--cache", str(work / "cache"),
              "--clips", "32", "--detector", "dlib", "--vit-init", "random", "--batch-size", str(batch),
              "--workers", "8", "--device", dev.type]
    if SMOKE:
        common += ["--clips", "2", "--image-size", "62", "--lda-size", "32", "--max-steps", "2", "--workers", "1"]
    runs = {}
    for name, extra in (("straight", ["--epochs", "2"]), ("split", ["--epochs", "1"]),
                        ("split", ["--epochs", "2", "--resume"])):
        t = time.perf_counter()
        r = subprocess.run([*common, "--out", str(work / name), *extra], capture_output=True, text=True)
        runs.setdefault(name, []).append({"returncode": r.returncode, "seconds": round(time.perf_counter() - t, 1),
                                          "stderr_tail": r.stderr.strip().splitlines()[-5:]})
        print(name, extra, runs[name][-1], flush=True)
        part["runs"] = runs
        _save(part, work, "train")
        if r.returncode:
            return
    epochs = [json.loads(x) for x in (work / "straight" / "metrics.jsonl").read_text().splitlines()]
    part["epochs"] = epochs
    last = epochs[-1]  # the second epoch: cuDNN and the loader warm
    part.update(clips_per_s=last["clips_per_s"], batch=batch, precision="bf16",
                peak_memory_gb=last.get("cuda_peak_memory_gb"), loader_workers=8)
    from safetensors import safe_open

    def weights(run):
        with safe_open(str(work / run / "last.safetensors"), "pt") as f:
            return {k: f.get_tensor(k).float() for k in f.keys() if k.startswith("model.")}

    a, b = weights("straight"), weights("split")
    part["resume_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    part["resume_bitwise_equal"] = all(torch.equal(a[k], b[k]) for k in a)


def stage_train_steady(part: dict, work: Path) -> None:
    """`deepscan train` over epochs long enough to time (36 steps of 32), on a cache of random
    crops written directly (no detection): loader workers 8 and 15, the second epoch timed."""
    import numpy as np
    from dataclasses import asdict

    from deepscan.data import load_dataset
    from deepscan.prepare import PrepareSettings, entry_name

    clips = 8 if SMOKE else 192
    size = {"image_size": 62, "lda_size": 32} if SMOKE else {}
    settings = PrepareSettings(clips=clips, **size)
    src, _, _ = _videos(work, 1)
    data = _ffpp_of_copies(src, work / "ffpp")
    cache = work / "cache-random"
    cache.mkdir(exist_ok=True)
    (cache / "cache.json").write_text(json.dumps(asdict(settings)))
    rng = np.random.default_rng(0)
    s, n, L = settings.image_size, settings.clip_len, settings.lda_size
    images = rng.integers(0, 255, (clips, s, s, 3), np.uint8)
    frames = rng.integers(0, 255, (clips, n, L, L, 3), np.uint8)
    _, items = load_dataset(data)
    for item in items:
        if item.split == "test":
            continue
        k = clips if item.split == "train" else 8  # a short validation: training is what is timed
        entry = cache / entry_name(item.key)
        entry.mkdir(exist_ok=True)
        np.save(entry / "image.npy", images[:k])
        np.save(entry / "frames.npy", frames[:k])
        (entry / "meta.json").write_text(json.dumps({"clips": k}))
    part["train_clips_per_epoch"] = sum(1 for i in items if i.split == "train") * clips
    rows = part.setdefault("rows", [])
    for workers in (2,) if SMOKE else (8, 15):
        args = [sys.executable, "-m", "deepscan", "train", "--data", str(data), "--cache", str(cache),
                "--clips", str(clips), "--detector", "dlib", "--vit-init", "random", "--batch-size", "2" if SMOKE else "32",
                "--workers", str(workers), "--device", _dev().type, "--epochs", "2", "--out", str(work / f"steady{workers}")]
        if SMOKE:
            args += ["--image-size", "62", "--lda-size", "32"]
        r = subprocess.run(args, capture_output=True, text=True)
        row = {"loader_workers": workers, "returncode": r.returncode}
        if r.returncode == 0:
            epochs = [json.loads(x) for x in (work / f"steady{workers}" / "metrics.jsonl").read_text().splitlines()]
            row.update({k: epochs[-1].get(k) for k in ("clips_per_s", "train_clips", "seconds", "cuda_peak_memory_gb")})
        else:
            row["stderr_tail"] = r.stderr.strip().splitlines()[-5:]
        rows.append(row)
        print(json.dumps(row), flush=True)
        _save(part, work, "train_steady")


def stage_prep_wide(part: dict, work: Path) -> None:
    """Preparation workers over 32 videos (the 16 of `prep` leave the last round half idle)."""
    _prep_rows(part, work, "prep_wide", 4 if SMOKE else 32, lambda cores: {1, 8, cores - 1, cores})


def stage_folder_workers(part: dict, work: Path) -> None:
    """The folder scan with every core a worker, and with one core left to the scanning process."""
    import resource

    from deepscan.faces import DetectorSpec
    from deepscan.perf import folder_throughput
    from deepscan.scan import cpu_count

    _, weights, folder = _videos(work, 4 if SMOKE else 64)
    runner = _runner()
    rows = part.setdefault("rows", [])
    cores = cpu_count()
    for workers in sorted({max(1, cores - 1), cores}):
        before = resource.getrusage(resource.RUSAGE_SELF)
        row = folder_throughput(folder, runner, DetectorSpec("dlib"), weights, CLIPS, BATCH, workers, rss=False)
        after = resource.getrusage(resource.RUSAGE_SELF)
        # CPU seconds of the scanning process itself (its threads; not the workers)
        row["scanner_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        _save(part, work, "folder_workers")


def stage_folder_profile(part: dict, work: Path) -> None:
    """Where the scanning process's core goes during a folder scan (it used a whole one on the
    H200, 2026-11-26, cause unknown): py-spy samples it for a while mid-scan; the leaf functions
    that take most samples, per thread, and the functions most often on the stack."""
    import collections

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    site = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    pyspy = next((str(Path(p) / "bin" / "py-spy") for p in site if (Path(p) / "bin" / "py-spy").exists()), pyspy)
    if not Path(pyspy).exists():
        raise RuntimeError("py-spy not found (carry its wheel in .dev/)")
    _, weights, folder = _videos(work, 4 if SMOKE else 128)  # ~30 s of scanning at ~140 clips/s
    scan = subprocess.Popen([sys.executable, "-m", "deepscan", "scan", str(folder[0].parent), "--weights", str(weights),
                             "--json", "--detector", "dlib", "--no-hash", "--clips", str(CLIPS),
                             "--batch-size", str(BATCH), "--device", _dev().type],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(3 if SMOKE else 12)  # past start-up, model load and the first batches
    raw = work / "profile.txt"
    t = time.perf_counter()
    r = subprocess.run([pyspy, "record", "--pid", str(scan.pid), "--duration", "3" if SMOKE else "10", "--rate", "200",
                        "--format", "raw", "--threads", "--idle", "--nonblocking", "--output", str(raw)],
                       capture_output=True, text=True)
    before = time.perf_counter() - t
    cpu = None
    try:
        fields = Path(f"/proc/{scan.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime so far
    except (OSError, IndexError, ValueError):
        pass
    part.update(pyspy_returncode=r.returncode, pyspy_stderr=r.stderr.strip()[-500:], sampled_s=round(before, 1),
                scan_cpu_s_so_far=cpu)
    scan.wait(timeout=600)
    part["scan_returncode"] = scan.returncode
    leaf, on_stack, threads = collections.Counter(), collections.Counter(), collections.Counter()
    if raw.exists():
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            n = int(count)
            threads[frames[0]] += n
            leaf[f"{frames[0][:40]} | {frames[-1]}"] += n
            for f in set(frames[1:]):
                on_stack[f] += n
    part.update(threads=threads.most_common(10), leaf=leaf.most_common(30), on_stack=on_stack.most_common(40))
    print(json.dumps(part, indent=1)[:6000], flush=True)


def stage_compile(part: dict, work: Path) -> None:
    from deepscan.perf import model_throughput

    r = model_throughput("spatial-temporal", "bf16", _dev(), BATCH, iters=1 if SMOKE else 10, use_compile=True)
    part.update(r)


# ---------------------------------------------------------------------------- driver
def run_stage(name: str, work: Path) -> int:
    part: dict = {}
    try:
        globals()[f"stage_{name}"](part, work)
        part["ok"] = True
    except Exception as exc:  # noqa: BLE001 - recorded, then the next stage runs
        import traceback

        part["ok"] = False
        part["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
    _save(part, work, name)
    return 0 if part["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--work", type=Path, default=Path("/tmp/deepscan-gpu"))
    ap.add_argument("--budget", type=float, default=480, help="seconds for all stages together")
    ap.add_argument("--stages", default=DEFAULT)
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return run_stage(args.stage, args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    result: dict = {"date": time.strftime("%Y-%m-%d"), "stages": {}}
    for name in [s for s in args.stages.split(",") if s]:
        left = deadline - time.monotonic()
        if left < 20:
            result["stages"][name] = {"ok": False, "error": "skipped: out of time"}
            continue
        limit = min(STAGES[name], left)
        (args.work / f"{name}.json").unlink(missing_ok=True)
        t = time.monotonic()
        with open(args.work / f"{name}.log", "w") as log:
            try:
                subprocess.run([sys.executable, __file__, "--stage", name, "--work", str(args.work)],
                               stdout=log, stderr=subprocess.STDOUT, timeout=limit, cwd=ROOT)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
        f = args.work / f"{name}.json"
        part = json.loads(f.read_text()) if f.exists() else {}
        if timed_out:
            part.update(ok=False, error=f"timed out after {limit:.0f} s (what it measured before is kept)")
        part["seconds"] = round(time.monotonic() - t, 1)
        with open(args.out / "gpu-stages.log", "a") as log:  # one file: few files come back from a lent machine
            log.write(f"===== {name} ({part['seconds']} s)\n" + (args.work / f"{name}.log").read_text())
        result["stages"][name] = part
        (args.out / "gpu-result.json").write_text(json.dumps(shape(result), indent=1))
        print(f"{name}: {'ok' if part.get('ok') else 'FAILED ' + part.get('error', '')[:300]} ({part['seconds']} s)",
              flush=True)
    print(summary(shape(result)))
    return 0


def shape(result: dict) -> dict:
    """The stages' parts in the layout the README and issue 13 name: throughput.{device_name,
    model, preparation, folder}, training."""
    st = result["stages"]
    env, folder = st.get("env", {}), dict(st.get("folder", {}))
    out = {"date": result["date"],
           "throughput": {"device_name": env.get("device_name"), "model": st.get("model", {}).get("rows", []),
                          "preparation": st.get("prep", {}).get("rows", []), "folder": folder,
                          "compile": st.get("compile")},
           "training": {k: v for k, v in st.get("train", {}).items()},
           "tests": st.get("tests"), "env": env, "nvdec": st.get("nvdec"), "blazeface": st.get("blazeface"),
           "device_prep": st.get("device_prep"),
           "follow_ups": {k: st[k] for k in ("train_steady", "prep_wide", "folder_workers", "folder_profile") if k in st},
           "stages": {k: {"ok": v.get("ok"), "seconds": v.get("seconds"), "error": v.get("error")}
                      for k, v in st.items()}}
    return out


def summary(r: dict) -> str:
    t = r["throughput"]
    lines = [f"device: {t['device_name']}"]
    for m in t["model"]:
        lines.append(f"  model {m['variant']:16s} {m['precision']:10s} b{m['batch']:<4d} {m['clips_per_s']:9.1f} clips/s"
                     + (" cudnn.benchmark" if m.get("cudnn_benchmark") else ""))
    for p in t["preparation"]:
        lines.append(f"  prep {p.get('detector', 'dlib'):9s} {p['workers']:2d} workers {p['clips_per_s']:8.1f} clips/s  "
                     f"x{p.get('x_one_worker')}")
    f = t["folder"]
    if "end_to_end_clips_per_s" in f:
        lines.append(f"  folder {f['videos']} videos {f['workers']} workers: {f['end_to_end_clips_per_s']} clips/s "
                     f"e2e vs {f['model_only_clips_per_s']} model-only (ratio {f['ratio_to_model_only']})")
    if f.get("preparation"):
        lines[-1] += f" [preparation {f['preparation']}, decoder {f.get('decoder')}, detector {f.get('detector')}]"
    for key in ("folder_workers", "folder_nvdec"):
        fw = f.get(key) or {}
        if fw:
            lines.append(f"  {key}: {fw.get('end_to_end_clips_per_s')} clips/s e2e {fw.get('error', '')}")
    if "nvdec_unavailable" in f:
        lines.append(f"  nvdec: {f['nvdec_unavailable'] or 'works'}")
    for key in ("one_video", "one_video_workers", "one_video_nvdec"):
        o = f.get(key) or {}
        lines.append(f"  {key}: {o.get('end_to_end_s')} s, warm {o.get('end_to_end_s_warm')} s, "
                     f"breakdown {o.get('breakdown_s')} {o.get('error', '')}")
    tr = r["training"]
    if tr.get("step_only"):
        lines.append(f"  train step only: {tr['step_only']}")
    if "clips_per_s" in tr:
        lines.append(f"  train CLI: {tr['clips_per_s']} clips/s, peak {tr['peak_memory_gb']} GB, "
                     f"resume max diff {tr.get('resume_max_abs_diff')}")
    if r.get("tests"):
        lines.append(f"  tests: {r['tests'].get('summary')}")
    c = t.get("compile") or {}
    if c.get("clips_per_s"):
        lines.append(f"  compile: {c['precision']} {c['clips_per_s']} clips/s (compile {c.get('compile_s')} s)")
    for k, v in r["follow_ups"].items():
        for row in v.get("rows", []):
            lines.append(f"  {k}: {json.dumps(row)[:300]}")
    for k in ("nvdec", "blazeface", "device_prep"):
        if r.get(k):
            lines.append(f"  {k}: {json.dumps(r[k])[:600]}")
    for k, v in r["stages"].items():
        if not v["ok"]:
            lines.append(f"  stage {k} FAILED: {(v['error'] or '')[:200]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
