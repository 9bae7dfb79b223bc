"""PIL's resampling as batched matrix products on a torch device: many crops, each with its own
size, position and filter, in a fixed number of operations (issue 32: per pass, not per face).

Why by hand: torch's ``interpolate`` has neither PIL's box filter nor its two-pass 8-bit
rounding, and the workers crop and letterbox with PIL; the first device version, with
``interpolate(antialias=True)``, moved BlazeFace's boxes by up to 14 px on 720p. Here each pass
is PIL's own filter (Resample.c's ``precompute_coeffs``: its taps, its 8-bit fixed point with 22
fraction bits, its rounding after each pass; Reduce.c's integer block means) written as a dense
(outputs x inputs) matrix per item, built on the device from a few numbers per item, so that the
count of operations does not grow with the number of crops.

Exact without float64 products: a weight w (an integer, |w| <= 2^22) is split into w = 2048 hi +
lo (lo in [0, 2048)); pixels are 8-bit integers, so x @ hi and x @ lo are sums of integer
products below 2^24, exact in float32 in any order, and also under TF32, whose 11 significant
bits hold every factor. Their float64 combination is PIL's sum. GPUs with a slow float64 rate
(RTX, L4, A10: 1/32-1/64) therefore run these passes at their float32 pace.
"""

from __future__ import annotations

import torch

FRACTION = 1 << 22  # PIL's 8-bit fixed point (normalize_coeffs_8bpc)
SPLIT = 2048.0  # weight = SPLIT * hi + lo, each part exact in float32 / TF32 products


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5  # PIL's bicubic
    x = x.abs()
    return torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                       torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


def _box(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x <= 0.5)).to(x.dtype)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0), "box": (_box, 0.5)}


def taps(size_in: torch.Tensor, span: torch.Tensor, size_out: torch.Tensor, out_max: int, width: int,
         filters: str | tuple[str, str], choose: torch.Tensor | None = None,
         valid: torch.Tensor | None = None) -> torch.Tensor:
    """PIL's filter from ``size_in`` input pixels over the span [0, span) to ``size_out`` outputs,
    per item (tensors of shape (B,)), as (B, out_max, width) weights in PIL's fixed point
    (float64 integers). ``filters``: a name, or two names and ``choose`` (B,) bool picking the
    first where True (each item its own filter, in the same operations). Rows from ``size_out``
    on are zero (black padding); input columns from ``size_in`` on, and where ``valid`` (B,
    width) is False (outside the frame: black), weigh 0."""
    first, second = (filters, filters) if isinstance(filters, str) else filters
    (f1, s1), (f2, s2) = FILTERS[first], FILTERS[second]
    span, size_out = span.double(), size_out.double()
    scale = span / size_out.clamp(min=1)
    fscale = scale.clamp(min=1.0)
    support = s1 if first == second else torch.where(choose, s1, s2).double()
    reach = support * fscale
    o = torch.arange(out_max, dtype=torch.float64, device=span.device)
    centre = (o[None, :] + 0.5) * scale[:, None]  # (B, O)
    # C's (int) truncates toward zero; clamped to the input as PIL does
    lo = torch.trunc(centre - reach[:, None] + 0.5).clamp(min=0)
    hi = torch.minimum(torch.trunc(centre + reach[:, None] + 0.5), size_in.double()[:, None])
    p = torch.arange(width, dtype=torch.float64, device=span.device)
    inside = (p >= lo[..., None]) & (p < hi[..., None])  # (B, O, W)
    x = (p - centre[..., None] + 0.5) / fscale[:, None, None]
    value = f1(x) if first == second else torch.where(choose[:, None, None], f1(x), f2(x))
    w = torch.where(inside, value, torch.zeros((), dtype=torch.float64, device=span.device))
    total = w.sum(dim=-1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(w))
    w = torch.where(w < 0, torch.trunc(-0.5 + w * FRACTION), torch.trunc(0.5 + w * FRACTION))
    rows = o[None, :] < size_out[:, None]
    w = w * rows[..., None]
    if valid is not None:
        w = w * valid[:, None, :]
    return w


def blocks(size_in: torch.Tensor, factor: torch.Tensor, out_max: int, width: int) -> torch.Tensor:
    """Reduce.c's blocks: (B, out_max, width) of 0/1, output o summing inputs [o f, (o + 1) f)
    below ``size_in`` (a partial block at the end holds what is left)."""
    p = torch.arange(width, device=size_in.device)
    o = torch.arange(out_max, device=size_in.device)
    f = factor[:, None, None]
    return ((p[None, None, :] // f == o[None, :, None]) & (p[None, None, :] < size_in[:, None, None])).float()


def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, C, R, W) float32 holding 8-bit integers, times weights (B, O, W) in PIL's fixed point,
    along x's last dimension -> (B, C, R, O) float64, exactly (the module's split products)."""
    hi = torch.floor(w / SPLIT)
    lo = w - hi * SPLIT
    big = torch.matmul(x, hi.float().transpose(-1, -2).unsqueeze(1))
    small = torch.matmul(x, lo.float().transpose(-1, -2).unsqueeze(1))
    return big.double() * SPLIT + small.double()


def round8(x: torch.Tensor) -> torch.Tensor:
    """A pass's fixed-point sums to 8 bits as PIL does: (sum + 2^21) >> 22, clipped (float32)."""
    return torch.floor_divide(x + (FRACTION >> 1), FRACTION).clamp_(0, 255).float()


def resize(x: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """PIL's two passes: x (B, C, H, W) 8-bit values, horizontal (B, OW, W) and vertical (B, OH, H)
    weights -> (B, C, OH, OW), rounded to 8 bits after each pass (float32)."""
    x = round8(product(x, horizontal))  # (B, C, H, OW)
    return round8(product(x.transpose(-1, -2), vertical)).transpose(-1, -2)


def reduce(x: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """Reduce.c's ``reduce``: x (B, C, H, W) 8-bit values, the 0/1 ``blocks`` of each direction
    -> the integer mean of each block, rounded as Reduce.c does ((sum + n/2) * floor(2^32 /
    (256 n)) >> 24, the multiplier in float32 as there) (float32)."""
    sums = torch.matmul(vertical.unsqueeze(1), torch.matmul(x, horizontal.transpose(-1, -2).unsqueeze(1)))
    n = (vertical.sum(-1)[:, :, None] * horizontal.sum(-1)[:, None, :]).to(torch.int64).clamp(min=1)[:, None]
    mult = (torch.full_like(n, 2 ** 32, dtype=torch.float32) / (256 * n).float()).to(torch.int64)
    return (((sums.round().to(torch.int64) + n // 2) * mult) >> 24).float()
