"""Self-blended pseudo-fakes (Shiohara & Yamasaki, CVPR 2022), for training from real videos.

A real face clip is turned into a fake one by blending a slightly altered copy of the face back
into itself: the copy gets a colour shift, a blur or sharpening (frequency change) and a small
scale/shift warp; a soft, face-shaped mask (an ellipse around the crop's centre, where the face
box sits, with random size and blur) is scaled by a random blend ratio. The same draw is applied
to the backbone image and to all n frames of the clip, so the blend is consistent in time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class BlendDraw:
    colour: tuple[float, float, float]  # per-channel additive shift, in [0, 255] units
    contrast: float
    blur: float  # > 0 blur radius (fraction of size); < 0 sharpen
    scale: float
    shift: tuple[float, float]  # fraction of the size
    axes: tuple[float, float]  # ellipse half-axes, fraction of the size
    centre: tuple[float, float]
    feather: float  # mask blur, fraction of the size
    ratio: float  # blend ratio


def draw(rng: np.random.Generator) -> BlendDraw:
    return BlendDraw(
        colour=tuple(rng.uniform(-20, 20, 3)),
        contrast=float(rng.uniform(0.9, 1.1)),
        blur=float(rng.choice([-1, 1]) * rng.uniform(0.002, 0.01)),
        scale=float(rng.uniform(0.95, 1.05)),
        shift=tuple(rng.uniform(-0.02, 0.02, 2)),
        axes=(float(rng.uniform(0.26, 0.36)), float(rng.uniform(0.32, 0.42))),
        centre=(float(0.5 + rng.uniform(-0.02, 0.02)), float(0.52 + rng.uniform(-0.02, 0.02))),
        feather=float(rng.uniform(0.02, 0.06)),
        ratio=float(rng.choice([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])),
    )


def _mask(size: int, d: BlendDraw) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    inside = ((xx - d.centre[0]) / d.axes[0]) ** 2 + ((yy - d.centre[1]) / d.axes[1]) ** 2 <= 1
    img = Image.fromarray((inside * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(d.feather * size))
    return np.asarray(img, np.float32)[..., None] / 255 * d.ratio


def _source(face: np.ndarray, d: BlendDraw) -> np.ndarray:
    size = face.shape[0]
    img = Image.fromarray(face)
    if d.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(d.blur * size))
    else:
        img = img.filter(ImageFilter.UnsharpMask(radius=max(1, -d.blur * size), percent=120))
    new = max(2, int(round(size * d.scale)))
    img = img.resize((new, new), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(img, (int(round((size - new) / 2 + d.shift[0] * size)), int(round((size - new) / 2 + d.shift[1] * size))))
    arr = np.asarray(canvas, np.float32)
    arr = (arr - 128) * d.contrast + 128 + np.asarray(d.colour, np.float32)
    return np.clip(arr, 0, 255)


def blend(face: np.ndarray, d: BlendDraw) -> np.ndarray:
    """One uint8 (S, S, 3) face crop -> its self-blended version."""
    mask = _mask(face.shape[0], d)
    out = _source(face, d) * mask + face.astype(np.float32) * (1 - mask)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def self_blend(image: np.ndarray, frames: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same pseudo-fake draw on the backbone image (S,S,3) and each LDA frame (n,s,s,3)."""
    d = draw(rng)
    return blend(image, d), np.stack([blend(f, d) for f in frames])
