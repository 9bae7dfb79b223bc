"""The folder target of the scaling issue, measured so that drift cancels: end-to-end scans of a
folder of generated 720p face videos and the model alone on the same clips, interleaved
(e2e, model, e2e, model, ...), each pair's ratio and the median of them. On a shared machine whose
speed wanders by 30 % within the hour, `bench`'s single e2e-then-model pair can land anywhere.

    python benchmarks/folder_ratio.py [--pairs 3] [--videos 16] [--clips 32] [--batch 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deepscan.config import config_for_variant
from deepscan.faces import DetectorSpec
from deepscan.scan.plan import ScanInput
from deepscan.model import LDADetector
from deepscan.perf import benchmark_inputs, emit, make_folder, model_only
from deepscan.scan import Runner, ScanSettings, Scanner, default_workers, model_lanes, pick_devices, pick_precision
from deepscan.scan.workers import prepare_video


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deepscan-folder-ratio")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    src, _ = benchmark_inputs(args.work, (1280, 720), 10)
    videos = make_folder(src, args.work / f"folder{args.videos}", args.videos)
    (device,) = pick_devices("auto")[:1]
    torch.manual_seed(0)
    runner = Runner(LDADetector(config_for_variant("spatial-temporal")), device, pick_precision("auto", device),
                    batch_size=args.batch)
    workers = default_workers([device]) if args.workers is None else args.workers
    settings = ScanSettings(clips=args.clips, batch_size=args.batch, hash_files=False, keep_crops=0)
    spec = DetectorSpec("dlib")
    clips = [c for c in prepare_video(0, str(videos[0]), spec.build(), settings.prep(runner.cfg))
             if not isinstance(c, tuple)]
    runner(clips[: args.batch])  # warm-up
    pairs = []
    with Scanner([runner], spec.build, spec.name, settings, workers=workers) as scanner:
        for k in range(args.pairs):
            records = []
            t = time.perf_counter()
            scanner.run([ScanInput(str(v), v.name) for v in videos], lambda rec, row: records.append(rec))
            e2e_s = time.perf_counter() - t
            face = sum(r["sampling"].get("face_clips", 0) for r in records)
            # the model alone on as many clips (the first video's, repeated), same batch size
            model_s = model_only(runner, (clips * (-(-face // len(clips))))[:face], args.batch)
            pairs.append({"face_clips": face, "end_to_end_clips_per_s": round(face / e2e_s, 3),
                          "model_only_clips_per_s": round(face / model_s, 3), "ratio": round(model_s / e2e_s, 3)})
            print(json.dumps(pairs[-1]), flush=True)
    result = {"device": str(device), "threads": torch.get_num_threads(),
              "lanes": [t for _, t in model_lanes([runner])], "workers": workers, "videos": args.videos,
              "clips": args.clips, "batch": args.batch, "pairs": pairs,
              "median_ratio": statistics.median(p["ratio"] for p in pairs)}
    emit(result, args.out)


if __name__ == "__main__":
    main()
