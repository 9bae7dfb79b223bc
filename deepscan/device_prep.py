"""Detection and crops on a torch device, batched over frames of many videos: the building blocks
of preparation on a GPU (decoded frames in, face crops for the model's batch out). They run on the
CPU too, so the suite checks them against the workers' path (onnxruntime BlazeFace, PIL crops).

Not yet wired into a scan: the scan still prepares in worker processes. What the GPU run must show
first is what these cost there (``benchmarks/gpu.py``, stage ``device_prep``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .faces import Detection


class DevicePreparer:
    """BlazeFace (full and short range) and square face crops, on ``device``, in batches.

    Crops: each square cut (black outside the frame) and resampled with PIL's own filters as
    matrices (``pil_resize``), so device crops equal the workers' PIL crops to a grey level."""

    def __init__(self, device: torch.device | str = "cpu", threshold: float = 0.5, nms: float = 0.3):
        from .blazeface import VARIANTS, build

        self.device = torch.device(device)
        self.full = build("full").to(self.device).eval()
        self.short = build("short").to(self.device).eval()
        self.sizes = {"full": VARIANTS["full"].size, "short": VARIANTS["short"].size}
        self.threshold, self.nms = threshold, nms

    @staticmethod
    def letterbox(frame: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
        """An (H, W, 3) uint8 frame -> (size, size, 3) float, scaled to fit (top-left, zero
        padding), and the scale."""
        h, w = frame.shape[:2]
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(frame.permute(2, 0, 1)[None].float(), size=(nh, nw), mode="bilinear", antialias=True,
                          align_corners=False)
        return F.pad(x, (0, size - nw, 0, size - nh))[0].permute(1, 2, 0), scale

    @torch.inference_mode()
    def detect(self, frames: list[torch.Tensor]) -> list[list[Detection]]:
        """Faces in each of ``frames`` ((H, W, 3) uint8 tensors on the device, of any videos and
        sizes): the full-range network on all the whole frames in one batch, then the short-range
        one on the frames where it found nothing (a close-up that fills the frame)."""
        out = self._whole(frames, "full")
        empty = [i for i, d in enumerate(out) if not d]
        if empty:
            for i, d in zip(empty, self._whole([frames[i] for i in empty], "short")):
                out[i] = d
        return out

    def _whole(self, frames: list[torch.Tensor], variant: str) -> list[list[Detection]]:
        from torchvision.ops import nms

        size = self.sizes[variant]
        boxed = [self.letterbox(f, size) for f in frames]
        boxes, keypoints, scores = (self.full if variant == "full" else self.short)(torch.stack([b for b, _ in boxed]))
        out = []
        for (_, scale), b, k, s in zip(boxed, boxes, keypoints, scores):
            factor = size / scale  # the letterbox square's side in frame pixels
            keep = s >= self.threshold
            b, k, s = b[keep] * factor, k[keep] * factor, s[keep]
            order = nms(b.float(), s.float(), self.nms)
            b, k, s = b[order].cpu().tolist(), k[order].cpu().tolist(), s[order].cpu().tolist()
            out.append([Detection(tuple(bb), float(ss), tuple(tuple(p) for p in kk)) for bb, kk, ss in zip(b, k, s)])
        return out

    @torch.inference_mode()
    def crops(self, clips: torch.Tensor, squares: list[tuple[int, tuple[int, int, int, int]]], image_size: int,
              lda_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Face crops for the model: ``clips`` (C, n, H, W, 3) uint8 on the device, ``squares``
        (clip index, (x1, y1, x2, y2) as ``faces.crop_box`` gives) -> images (K, S, S, 3) and
        frames (K, n, s, s, 3), uint8, on the device: what ``faces.face_clips`` makes on the CPU,
        resampled as PIL does (``pil_resize``), so that scores agree."""
        n = clips.shape[1]
        images, frames = [], []
        for ci, square in squares:
            block = _cut(clips[ci], square)  # (n, side, side, 3), black outside the frame
            images.append(pil_resize(block[:1], image_size)[0])
            frames.append(pil_resize(block, lda_size))
        if not squares:
            empty = clips.new_zeros((0, image_size, image_size, 3)), clips.new_zeros((0, n, lda_size, lda_size, 3))
            return empty
        return torch.stack(images), torch.stack(frames)


def _cut(frames: torch.Tensor, square: tuple[int, int, int, int]) -> torch.Tensor:
    """``square`` of (n, H, W, 3) frames, zero (black) where it leaves them: ``faces.crop_square``."""
    x1, y1, x2, y2 = square
    h, w = frames.shape[1:3]
    side = x2 - x1
    out = frames.new_zeros((frames.shape[0], side, side, 3))
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        out[:, sy1 - y1: sy2 - y1, sx1 - x1: sx2 - x1] = frames[:, sy1:sy2, sx1:sx2]
    return out


def _bicubic(x: float) -> float:
    a = -0.5  # PIL's bicubic
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


_WEIGHTS: dict = {}


def _weights(size_in: int, size_out: int, device) -> torch.Tensor:
    """(out, in) resampling weights as PIL computes them (Resample.c, precompute_coeffs): a box
    filter to reduce (``faces.crop_square`` reduces with Image.BOX), bicubic to enlarge."""
    key = (size_in, size_out, str(device))
    if key not in _WEIGHTS:
        import math

        filt, support = (_bicubic, 2.0) if size_in < size_out else (_box, 0.5)
        scale = size_in / size_out
        fscale = max(scale, 1.0)
        support *= fscale
        w = torch.zeros(size_out, size_in, dtype=torch.float64)
        for i in range(size_out):
            centre = (i + 0.5) * scale
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), size_in)
            k = [filt((x - centre + 0.5) / fscale) for x in range(lo, hi)]
            total = math.fsum(k)
            if total:
                w[i, lo:hi] = torch.tensor(k, dtype=torch.float64) / total
        _WEIGHTS[key] = w.to(device=device, dtype=torch.float32)
    return _WEIGHTS[key]


def pil_resize(square: torch.Tensor, size: int) -> torch.Tensor:
    """(n, side, side, 3) uint8 -> (n, size, size, 3) uint8, as PIL's ``resize`` of ``faces.
    crop_square`` (bicubic to enlarge, box to reduce; horizontal pass, rounding to 8 bits, then
    vertical). Why by hand: torch's interpolate has PIL's bicubic (antialias=True) but not its box
    filter, which differed by ~2 grey levels on average, enough to move scores by 0.05."""
    side = square.shape[1]
    if side == size:
        return square
    w = _weights(side, size, square.device)
    x = square.permute(0, 3, 1, 2).float()  # (n, 3, side, side)
    x = (x @ w.T).round_().clamp_(0, 255)  # horizontal
    x = (w @ x).round_().clamp_(0, 255)  # vertical
    return x.to(torch.uint8).permute(0, 2, 3, 1)
