"""Throughput benchmarks behind ``deepscan bench --throughput`` (never timed assertions in tests).

- model: clips/s per variant and precision at full size on the current device, one stream (a CPU
  scan runs several single-threaded lanes side by side: see ``lanes``); the baseline is
  fp32 in NCHW layout, the fast path what ``--precision auto`` picks (channels_last + bf16 on CPUs
  with native bf16, bf16/fp16 autocast on CUDA);
- end to end: a scan of generated 720p face videos of 10 s and 10 min at the same sampling, with
  its breakdown (decode, detect + crop, model), beside the model alone on the very same face clips;
- memory: peak RSS of a scan of a generated 1-hour 1080p video, in a child process, and CUDA
  max allocated memory when on GPU;
- preparation: face clips/s of 1, 2, ... worker processes with the model switched off, on a
  folder of 16 generated 720p face videos;
- folder: a scan of that folder end to end (clips/s, peak RSS of the scanning process) beside the
  model alone at the same batch size.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import config_for_variant
from .model import LDADetector


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_throughput(variant: str, precision: str, device: torch.device, batch: int, iters: int = 3,
                     use_compile: bool = False) -> dict:
    """Clips per second through the full-size model; precision 'fp32-nchw' is the plain baseline.
    With ``use_compile`` the fast path goes through torch.compile, and the compile time is kept."""
    from .scan import Runner, pick_precision

    cfg = config_for_variant(variant)
    model = LDADetector(cfg).eval().to(device)
    image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    frames = None if variant == "xception" else torch.randn(batch, cfg.clip_len, 3, cfg.lda_size, cfg.lda_size, device=device)
    if precision == "fp32-nchw":
        dtype, autocast = torch.float32, False
    else:
        dtype = pick_precision(precision, device)
        autocast = dtype != torch.float32
        # the same layout choices as a scan, and the same compiled graph
        runner = Runner(model, device, dtype, use_compile=use_compile, batch_size=batch,
                        say=lambda m: print(m, file=sys.stderr))
        model = runner.forward
        image = image.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
        t = time.perf_counter()
        model(image, frames)  # warm-up (and compilation)
        _sync(device)
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(iters):
            model(image, frames)
        _sync(device)
        dt = time.perf_counter() - t
    name = precision if precision == "fp32-nchw" else str(dtype).split(".")[-1]
    if use_compile and runner.compiled:  # not if compilation failed and it ran eager
        name += "+compile"
    out = {"variant": variant, "precision": name, "backend": "torch", "device": str(device), "batch": batch,
           "clips_per_s": round(batch * iters / dt, 2)}
    if use_compile:
        out["compiled"] = runner.compiled
        out["compile_s"] = round(first_s, 1)
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def backend_throughput(variant: str, device: torch.device, batch: int, pairs: int = 2, say=print) -> list[dict]:
    """The model alone through a scan's CPU lanes, torch against OpenVINO at the same variant,
    precision (the scan's auto) and batch, interleaved in ``pairs``; OpenVINO's cold start
    (conversion and compilation) and warm start (from its disk cache). Empty off CPU or without
    OpenVINO."""
    import copy
    import shutil

    from .scan.score_openvino import OpenVinoRunner, cache_root, installed
    from .scan import Runner, cpu_lanes, pick_precision, score_in_lanes

    if device.type != "cpu" or not installed():
        return []
    cfg = config_for_variant(variant)
    dtype = pick_precision("auto", device)
    torch.manual_seed(0)
    model = LDADetector(cfg).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (batch, cfg.image_size, cfg.image_size, 3), np.uint8)
    frames = rng.integers(0, 255, (batch, cfg.clip_len, cfg.lda_size, cfg.lda_size, 3), np.uint8)
    batches = [(images, frames)] * 4
    key = f"bench-{time.time_ns()}"  # a fresh entry: the first start is a cold one
    before = set(cache_root().glob("*")) if cache_root().is_dir() else set()
    say(f"model throughput: {variant}, torch and openvino lanes")
    try:
        t = time.perf_counter()
        ov_runner = OpenVinoRunner(copy.deepcopy(model), dtype, key=key, batch_size=batch)
        ov_runner.ready()
        cold = time.perf_counter() - t
        t = time.perf_counter()
        ov_runner = OpenVinoRunner(copy.deepcopy(model), dtype, key=key, batch_size=batch)
        ov_runner.ready()  # compiled and warmed in a thread of its own: waited for
        warm = time.perf_counter() - t
        runners = {"torch": Runner(copy.deepcopy(model), device, dtype, batch_size=batch), "openvino": ov_runner}
        for r in runners.values():
            score_in_lanes([r], batches[:1])  # warm-up
        rows = []
        for _ in range(pairs):
            for name, r in runners.items():
                t = time.perf_counter()
                score_in_lanes([r], batches)
                rows.append({"variant": variant, "precision": str(dtype).split(".")[-1], "backend": name,
                             "device": "cpu", "batch": batch, "lanes": len(cpu_lanes(r.threads)),
                             "clips_per_s": round(len(batches) * batch / (time.perf_counter() - t), 2)})
        for row in rows:
            if row["backend"] == "openvino":
                row.update(cold_start_s=round(cold, 2), warm_start_s=round(warm, 2))
        return rows
    finally:
        for entry in set(cache_root().glob("*")) - before:  # the bench's own entry only
            shutil.rmtree(entry, ignore_errors=True)


def model_only(runner, clips: list, batch: int) -> float:
    """Seconds the model alone takes over ``clips`` in batches of ``batch``, through the same lanes
    as a scan (scan.score_in_lanes: several single-threaded ones on CPU)."""
    from .scan import score_in_lanes

    batches = [(np.stack([c.image for c in clips[i:i + batch]]), np.stack([c.frames for c in clips[i:i + batch]]))
               for i in range(0, len(clips), batch)]
    _sync(runner.device)
    t = time.perf_counter()
    score_in_lanes([runner], batches)
    _sync(runner.device)
    return time.perf_counter() - t


def make_videos(folder: Path, face_video_10s: Path | None = None) -> dict[str, Path]:
    """720p face videos of 10 s and 10 min, and a 1080p one of 1 hour (stream copies of a 10 s clip)."""
    from .video import ffmpeg_exe

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, size in (("720p", (1280, 720)), ("1080p", (1920, 1080))):
        src = folder / f"face_{name}_10s.mp4"
        if not src.exists():
            _write_face_video(src, size)
        out[f"{name}_10s"] = src
    for key, src, seconds in (("720p_10min", out["720p_10s"], 600), ("1080p_1h", out["1080p_10s"], 3600)):
        dst = folder / f"face_{key}.mp4"
        if not dst.exists():
            subprocess.run([ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-nostdin", "-stream_loop", "-1",
                            "-i", str(src), "-t", str(seconds), "-c", "copy", str(dst)], check=True)
        out[key] = dst
    return out


def _write_face_video(path: Path, size: tuple[int, int], seconds: int = 10, fps: int = 25) -> None:
    """A face (scikit-image's astronaut, if installed; else a drawn oval) moving over a background."""
    from PIL import Image, ImageDraw

    from .video import ffmpeg_exe

    w, h = size
    try:
        from skimage import data

        face = Image.fromarray(data.astronaut()[:300, 100:400]).resize((h // 2, h // 2))
    except ImportError:
        face = Image.new("RGB", (h // 2, h // 2), (120, 100, 90))
        ImageDraw.Draw(face).ellipse([h // 10, h // 20, h // 2 - h // 10, h // 2 - h // 20], fill=(220, 180, 160))
    proc = subprocess.Popen([ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-nostdin", "-f", "rawvideo",
                             "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:", "-c:v", "libx264",
                             "-preset", "ultrafast", "-g", str(fps * 2), "-pix_fmt", "yuv420p", str(path)],
                            stdin=subprocess.PIPE)
    bg = np.full((h, w, 3), 70, np.uint8)
    for i in range(seconds * fps):
        frame = bg.copy()
        x = (w // 4) + int(40 * np.sin(i / 20))
        frame[h // 4: h // 4 + face.height, x: x + face.width] = np.asarray(face)
        proc.stdin.write(frame.tobytes())
    proc.stdin.close()
    if proc.wait():
        raise RuntimeError(f"ffmpeg failed writing {path}")


def end_to_end(video: Path, runner, spec, clips: int, batch: int, workers: int, preparation: str = "workers",
               decoder: str = "ffmpeg") -> dict:
    """Scan ``video`` end to end (workers started before the clock), then the same video again
    under another name in the same scanner (warm: workers, model and caches in use), then the
    model alone on the same face clips."""
    from .scan import Scanner, ScanSettings
    from .scan.plan import ScanInput
    from .scan.workers import prepare_video

    settings = ScanSettings(clips=clips, batch_size=batch, hash_files=False, keep_crops=0, preparation=preparation,
                            decoder=decoder)
    second = make_folder(video, video.parent / f"{video.stem}-warm", 1)[0]
    records, firsts = [], []
    start = time.perf_counter()  # the scanner's start (workers, lanes' and detector's warm-ups) is in it

    def keep(rec, row):
        records.append(rec)
        firsts.append(time.perf_counter() - start)

    with Scanner([runner], spec.build, spec.name, settings, workers=workers) as scanner:
        t = time.perf_counter()
        scanner.run([ScanInput(str(video), video.name)], keep)
        total = time.perf_counter() - t
        t = time.perf_counter()
        scanner.run([ScanInput(str(second), second.name)], lambda rec, row: records.append(rec))
        warm = time.perf_counter() - t
    res = records[0]
    detector = spec.build()
    face_clips = [ev for ev in prepare_video(0, str(video), detector, settings.prep(runner.cfg))
                  if not isinstance(ev, tuple)]
    model_s = model_only(runner, face_clips, batch)
    return {"video": video.name, "duration_s": res["video"]["duration_s"] if res["video"] else None,
            "face_clips": len(face_clips), "end_to_end_s": round(total, 3), "end_to_end_s_warm": round(warm, 3),
            "model_only_s": round(model_s, 3), "preparation": preparation, "decoder": decoder,
            "ratio": round(total / model_s, 3) if model_s else None, "strategy": res["sampling"].get("strategy"),
            "workers": workers, "breakdown_s": dict(res["timings"]),
            "start_to_first_record_s": round(firsts[0], 3)}


def preparation_throughput(videos: list[Path], spec, prep, counts: list[int], say=print) -> list[dict]:
    """Face clips/s of ``n`` preparation workers for each n in ``counts``, model switched off: every
    clip's slot is handed back at once. Worker start-up is outside the clock."""
    from .scan.events import Clip, Done, Lost
    from .scan.workers import PreparePool

    out = []
    for n in counts:
        say(f"preparation: {n} worker(s)")
        with PreparePool(n, prep, spec.build, slots_per_worker=16) as pool:
            pool.begin_run()
            todo = list(enumerate(map(str, videos)))
            clips = done = 0
            t = time.perf_counter()
            while done < len(videos):
                while todo and pool.capacity():
                    pool.submit(*todo.pop(0))
                events, _ = pool.poll(1.0)
                for ev in events:
                    if isinstance(ev, Clip):
                        clips += 1
                        pool.free([ev.slot])
                    elif isinstance(ev, (Done, Lost)):
                        done += 1
            dt = time.perf_counter() - t
        out.append({"detector": spec.name, "workers": n, "clips_per_s": round(clips / dt, 2), "face_clips": clips,
                    "seconds": round(dt, 2)})
    base = out[0]["clips_per_s"]
    for row in out:
        row["x_one_worker"] = round(row["clips_per_s"] / base, 2)
    return out


def folder_throughput(videos: list[Path], runner, spec, weights: Path, clips: int, batch: int, workers: int,
                      rss: bool = True, preparation: str = "workers", decoder: str = "ffmpeg") -> dict:
    """End-to-end clips/s over a folder of videos (in this process, workers started before the
    clock), the model alone at the same batch size on real face clips, and the peak RSS of a
    `deepscan scan` of the same folder in a fresh process."""
    from .scan.plan import ScanInput
    from .scan import Scanner, ScanSettings
    from .scan.workers import prepare_video

    settings = ScanSettings(clips=clips, batch_size=batch, hash_files=False, keep_crops=0, preparation=preparation,
                            decoder=decoder)
    records, firsts = [], []
    start = time.perf_counter()

    def keep(rec, row):
        records.append(rec)
        firsts.append(time.perf_counter() - start)

    with Scanner([runner], spec.build, spec.name, settings, workers=workers) as scanner:
        t = time.perf_counter()
        scanner.run([ScanInput(str(v), v.name) for v in videos], keep)
        dt = time.perf_counter() - t
    face = sum(r["sampling"].get("face_clips", 0) for r in records)
    sample = [ev for ev in prepare_video(0, str(videos[0]), spec.build(), settings.prep(runner.cfg))
              if not isinstance(ev, tuple)]
    sample = (sample * (-(-4 * batch // max(1, len(sample)))))[: 4 * batch]
    runner(sample[:batch])  # warm-up
    model = len(sample) / model_only(runner, sample, batch)
    end_to_end = face / dt
    out = {"videos": len(videos), "face_clips": face, "workers": workers, "batch": batch,
           "preparation": preparation, "decoder": decoder, "detector": spec.name,
           "end_to_end_clips_per_s": round(end_to_end, 2), "model_only_clips_per_s": round(model, 2),
           "ratio_to_model_only": round(end_to_end / model, 3), "seconds": round(dt, 2),
           "start_to_first_record_s": round(firsts[0], 3) if firsts else None}
    if rss:
        extra = ["--workers", str(workers), "--preparation", preparation]
        out["peak_rss_mb"] = scan_peak_rss(videos[0].parent, weights, clips, extra=extra)["peak_rss_mb"]
    return out


def benchmark_inputs(work: Path, size: tuple[int, int], seconds: int) -> tuple[Path, Path]:
    """A generated face video of ``size`` and ``seconds`` and an untrained spatial-temporal
    checkpoint in ``work`` (made once, reused by later runs): what the benchmark scripts scan."""
    from .checkpoint import save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    src = work / f"face_{size[1]}p_{seconds}s.mp4"
    if not src.exists():
        _write_face_video(src, size, seconds=seconds)
    weights = work / "untrained.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        save_checkpoint(LDADetector(config_for_variant("spatial-temporal")), weights, untrained=True)
    return src, weights


def make_folder(src: Path, folder: Path, count: int) -> list[Path]:
    """``count`` copies of a video under distinct names (hard links where possible)."""
    import os
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        dst = folder / f"video{i:04d}{src.suffix}"
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy(src, dst)
        out.append(dst)
    return out


def detector_fps(video: Path, names=("dlib", "blazeface", "scrfd"), frames: int = 64, say=print) -> list[dict]:
    """Frames per second of each available detector on ``frames`` decoded frames of ``video``, one
    thread: the whole detector one frame at a time (batch 1), and, for a batched detector, the
    frames in batches of 64 (letterbox and network; what device preparation does)."""
    from dataclasses import replace

    from .errors import DeepscanError
    from .faces import resolve_detector
    from .video import plan_clips, probe, read_clips

    info = probe(video)
    images = [c.frames[0] for c in read_clips(info, plan_clips(info.num_frames, frames, 1), 1)]
    out = []
    for name in names:
        try:
            spec = resolve_detector(name, say=say)
        except DeepscanError as exc:
            out.append({"detector": name, "available": False, "reason": str(exc)})
            continue
        det = replace(spec, threads=1).build()
        det(images[0])  # warm-up
        t = time.perf_counter()
        found = sum(len(det(im)) > 0 for im in images)
        dt = time.perf_counter() - t
        row = {"detector": name, "available": True, "batch": 1, "frames_per_s": round(len(images) / dt, 1),
               "frames_with_face": f"{found}/{len(images)}", "frame_size": f"{info.width}x{info.height}"}
        out.append(row)
        if hasattr(det, "detect_frames"):
            det.detect_frames(images[:2])
            t = time.perf_counter()
            found = sum(len(d) > 0 for k in range(0, len(images), 64) for d in det.detect_frames(images[k:k + 64]))
            dt = time.perf_counter() - t
            out.append({**row, "batch": 64, "frames_per_s": round(len(images) / dt, 1),
                        "frames_with_face": f"{found}/{len(images)}"})
    return out


_RSS_WRAPPER = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True); "
    "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def scan_peak_rss(video: Path, weights: Path, clips: int, extra: list[str] | None = None,
                  json_out: bool = True) -> dict:
    """Peak RSS (MB) of `deepscan scan` on ``video`` (a file or a folder): the largest process of its
    tree (the scanning process; workers and ffmpeg are smaller). A fresh wrapper process runs the
    scan, so nothing measured earlier counts."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "deepscan", "scan", str(video), "--weights", str(weights),
           "--clips", str(clips), "--no-hash", "--detector", "dlib", *(["--json"] if json_out else []), *(extra or [])]
    out = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], capture_output=True, text=True, check=True)
    code, kb = out.stdout.split()
    return {"video": video.name, "exit_code": int(code), "seconds": round(time.perf_counter() - t, 2),
            "peak_rss_mb": round(int(kb) / 1024, 1)}


def run_all(device: torch.device, variants: list[str], precisions: list[str], batch: int, clips: int,
            workdir: Path | None = None, say=print, use_compile: bool = False, workers: int | None = None,
            backend: str = "auto") -> dict:
    from .checkpoint import save_checkpoint
    from .faces import resolve_detector
    from .scan import ScanSettings, cpu_count, default_workers, make_runner, model_lanes, pick_precision

    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cores": cpu_count(), "model": []}
    if device.type == "cuda":
        result["gpu"] = result["device_name"] = torch.cuda.get_device_name(device)
    for v in variants:
        for p in precisions:
            say(f"model throughput: {v} {p}")
            result["model"].append(model_throughput(v, p, device, batch))
    result["backends"] = backend_throughput("spatial-temporal", device, batch, say=say)
    if use_compile:
        say("model throughput: spatial-temporal auto, torch.compile")
        result["model"].append(model_throughput("spatial-temporal", "auto", device, batch, use_compile=True))
    work = Path(workdir or tempfile.mkdtemp(prefix="deepscan-bench-"))
    say(f"generating benchmark videos in {work}")
    videos = make_videos(work)
    say("detector speed on 720p frames")
    result["detectors"] = detector_fps(videos["720p_10s"], say=say)
    cfg = config_for_variant("spatial-temporal")
    torch.manual_seed(0)
    model = LDADetector(cfg)
    weights = save_checkpoint(model, work / "bench-untrained.safetensors", untrained=True)
    from .hashing import sha256_file
    from .scan.score_openvino import pick_backend

    result["backend"] = pick_backend(backend, device)
    runner = make_runner(model, device, pick_precision("auto", device), result["backend"], batch_size=batch,
                         key=sha256_file(weights))
    # as a scan runs it: each worker's onnxruntime on one thread (its default of one per core
    # makes workers fight over the cores: 2 workers ran at 1.04x one in a first measurement)
    spec = dataclasses.replace(resolve_detector("auto", say=say), threads=1)
    workers = default_workers([device]) if workers is None else workers
    result["detector"], result["workers"] = spec.name, workers
    result["lanes"] = [t for _, t in model_lanes([runner])]  # threads of each model lane of a scan
    e2e = []
    for key in ("720p_10s", "720p_10min"):
        say(f"end to end: {key}")
        e2e.append(end_to_end(videos[key], runner, spec, clips, batch, workers))
    result["end_to_end"] = e2e
    result["long_over_short"] = round(e2e[1]["end_to_end_s"] / e2e[0]["end_to_end_s"], 3)
    folder = make_folder(videos["720p_10s"], work / "folder16", 16)
    prep = ScanSettings(clips=clips, hash_files=False).prep(cfg)
    counts = sorted({1, 2, 4, 8, result["cores"] - 1, result["cores"]} & set(range(1, result["cores"] + 1)))
    result["preparation"] = preparation_throughput(folder, spec, prep, counts, say=say)
    if spec.name != "dlib":  # the paper's detector beside it, one worker on the same videos
        from .faces import DetectorSpec

        dlib_row = preparation_throughput(folder, DetectorSpec("dlib"), prep, [1], say=say)[0]
        dlib_row["x_one_worker"] = round(dlib_row["clips_per_s"] / result["preparation"][0]["clips_per_s"], 2)
        result["preparation"].append(dlib_row)
    say(f"folder end to end: {len(folder)} videos, {workers} worker(s)")
    result["folder"] = folder_throughput(folder, runner, spec, weights, clips, batch, workers)
    result["folder"]["backend"] = result["backend"]
    if result["backend"] != "torch":  # today's torch path beside it, on the same folder
        say(f"folder end to end: {len(folder)} videos, torch")
        import copy

        torch_runner = make_runner(copy.deepcopy(model), device, pick_precision("auto", device), "torch",
                                   batch_size=batch)  # the same weights (folding them again is harmless)
        row = folder_throughput(folder, torch_runner, spec, weights, clips, batch, workers, rss=False)
        result["folder_torch"] = {**row, "backend": "torch",
                                  "openvino_over_torch": round(result["folder"]["end_to_end_clips_per_s"]
                                                               / row["end_to_end_clips_per_s"], 2)}
    if spec.name == "blazeface":  # the other preparation on the same folder: which is faster here
        say(f"folder end to end: {len(folder)} videos, preparation on {device}")
        row = folder_throughput(folder, runner, spec, weights, clips, batch, workers, rss=False, preparation="device")
        result["folder_device"] = {**row, "backend": result["backend"],
                                   "device_over_workers": round(row["end_to_end_clips_per_s"]
                                                                / result["folder"]["end_to_end_clips_per_s"], 2)}
    say("peak RSS: 1-hour 1080p scan")
    result["memory"] = scan_peak_rss(videos["1080p_1h"], weights, clips)
    base = {(m["variant"]): m["clips_per_s"] for m in result["model"] if m["precision"] == "fp32-nchw"}
    result["speedup_over_fp32_nchw"] = {
        f"{m['variant']}/{m['precision']}": round(m["clips_per_s"] / base[m["variant"]], 2)
        for m in result["model"] if m["precision"] != "fp32-nchw" and m["variant"] in base
    }
    result["workdir"] = str(work)
    return result


def emit(result: dict, out: Path | None = None) -> None:
    """A benchmark script's result: JSON on stdout, and into ``out`` when given."""
    import json

    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
