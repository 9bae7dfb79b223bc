"""Preparation on a torch device (``--preparation device``): detection, tracking and crops of
clips whose frames the workers only decoded, batched over frames of many videos.

The workers hand over each sampled clip's frames (``PrepSettings.handover == "frames"``); the
scanning process moves them to the device and, for the next clip of every video in flight at
once, runs BlazeFace's staged search (the same generator, ``faces.blazeface_search``, drives the
workers' detector, so both take the same decisions), links the faces to tracks on the CPU (a
few boxes), and cuts the model's crops on the device, straight into its batch.

Why resampling is written by hand: the workers letterbox with PIL (``reducing_gap``: an
integer box reduction, then bilinear) and crop with PIL (box to reduce, bicubic to enlarge);
torch's ``interpolate`` has neither PIL's box filter nor its two-pass rounding, and the first
version, with ``interpolate(antialias=True)``, moved BlazeFace's boxes by up to 14 px on 720p
and a score by 0.054 (roi_align). Here each resize is PIL's own filter written as a matrix
(Resample.c's coefficients, its 8-bit rounding after each pass; Reduce.c's integer averages),
so a device crop is within a grey level or two of the worker's.

It runs on the CPU too (``--device cpu --preparation device``), which is how the suite checks
it against the workers; on a CPU the workers are faster (README, 'Preparation on the device').
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import faces as faces_mod
from ..faces import Detection, Tracker, blazeface_search, crop_box, filter_faces, nms_detections, view_detections


@dataclass
class RawClip:
    """A decoded clip waiting for the device: where its frames are and what the record needs."""

    key: object  # whose it is (the scan's input index)
    index: int  # clip number in the video's plan
    frame_indices: tuple[int, ...]
    times: tuple[float, ...]
    frames: torch.Tensor  # (n, H, W, 3) uint8, on the device (or a view of a slot, on the CPU)


@dataclass
class DeviceClip:
    """A face clip cut on the device (``workers.ClipMeta``'s fields plus its pixels)."""

    key: object
    track_id: int
    clip_index: int
    frame_index: int
    time_s: float
    box: tuple[float, float, float, float]
    image: torch.Tensor = field(repr=False)  # (S, S, 3) uint8
    frames: torch.Tensor = field(repr=False)  # (n, s, s, 3) uint8
    det_score: float = 1.0  # the detector's confidence (a single sighting must be sure: assemble.CONFIRM_SINGLE)


class DevicePreparer:
    """BlazeFace (full and short range), tracking and square face crops, on ``device``, batched.

    ``step`` takes the next clip of any number of videos and returns their face clips; a video's
    tracker lives here from its first clip until ``forget``."""

    def __init__(self, device: torch.device | str = "cpu", *, image_size: int = 398, lda_size: int = 224,
                 margin: float | None = None, min_face: int = faces_mod.MIN_FACE, threshold: float = 0.5,
                 nms: float = 0.3):
        from ..blazeface import VARIANTS, build
        from ..config import CROP_MARGIN

        self.device = torch.device(str(device))  # also hardware.CPU
        self.nets = {False: build("full").to(self.device).eval(), True: build("short").to(self.device).eval()}
        self.sizes = {False: VARIANTS["full"].size, True: VARIANTS["short"].size}
        self.threshold, self.nms = threshold, nms
        self.image_size, self.lda_size = image_size, lda_size
        self.margin = CROP_MARGIN if margin is None else margin
        self.min_face = min_face
        self.trackers: dict = {}

    # ---- a scan's step
    @torch.inference_mode()
    def step(self, clips: list[RawClip]) -> list[list[DeviceClip]]:
        """The face clips of each of ``clips`` (at most one per video: a video's search depends on
        its tracker after the clip before), detected in stages batched across them, as the
        workers do it (``workers.prepare_video``)."""
        from .workers import search_flags

        items = []
        for c in clips:
            tracker = self.trackers.setdefault(c.key, Tracker())
            flags = search_flags(c.index)
            items.append((c.frames[0], tracker.recent(), tracker.active(), flags["deep"], flags["full"],
                          flags["crowd"]))
        found = self.search(items)
        out = []
        for c, dets in zip(clips, found):
            dets = filter_faces(dets, self.min_face)
            ids = self.trackers[c.key].assign(dets)
            squares = [crop_box(d.box, self.margin) for d in dets]
            images, frames = self.crop_clip(c.frames, squares, self.image_size, self.lda_size)
            out.append([DeviceClip(c.key, tid, c.index, c.frame_indices[0], c.times[0], d.box, images[j], frames[j],
                                   d.score) for j, (d, tid) in enumerate(zip(dets, ids))])
        return out

    def forget(self, key) -> None:
        self.trackers.pop(key, None)

    # ---- detection
    def search(self, items) -> list[list[Detection]]:
        """Faces in each frame of ``items`` ((frame, hints, follow, deep, full[, crowd]): frames (H, W, 3)
        uint8 on the device, of any sizes), by ``faces.blazeface_search``'s stages: every round
        takes the next stage of each frame still searching, in one batch per network."""
        from ..blazeface import VARIANTS

        size = VARIANTS["full"].size
        gens, asks, out = {}, {}, [None] * len(items)
        for i, (frame, hints, follow, deep, full, *crowd) in enumerate(items):
            h, w = frame.shape[:2]
            gens[i] = blazeface_search(h, w, size, hints, follow=follow, deep=deep, min_face=self.min_face, full=full,
                                       crowd=crowd[0] if crowd else None)
            asks[i] = next(gens[i])  # every search looks at something first
        while asks:
            keys = list(asks)
            answers = self.run_views([(items[i][0], *asks[i]) for i in keys])
            asks = {}
            for i, found in zip(keys, answers):
                try:
                    asks[i] = gens[i].send(found)
                except StopIteration as done:
                    out[i] = done.value
        return out

    def detect(self, frames: list[torch.Tensor]) -> list[list[Detection]]:
        """Faces in whole frames (of any videos and sizes), with no tracks: the full-range network
        on all, then the short-range one where it found nothing (bench, the GPU script)."""
        return self.search([(f, (), (), False, True) for f in frames])

    @torch.inference_mode()
    def run_views(self, asks: list[tuple[torch.Tensor, list, bool]]) -> list[list[Detection]]:
        """Faces in the square views (x, y, side) of each (frame, views, near): one batch through
        the full-range network and one through the short-range one, whatever the frames."""
        out: list = [[] for _ in asks]
        for near in (False, True):
            mine = [k for k, (_, views, n) in enumerate(asks) if n == near and views]
            if not mine:
                continue
            size = self.sizes[near]
            cut = [(k, x, y, s, asks[k][0][y:y + s, x:x + s]) for k in mine for x, y, s in asks[k][1]]
            boxes, keypoints, scores = self.nets[near](letterbox_many([c[4] for c in cut], size))
            # only the few anchors above the threshold leave the device
            keep = scores >= self.threshold
            where = keep.nonzero()[:, 0].cpu().numpy()
            b, kp, sc = (t[keep].float().cpu().numpy() for t in (boxes, keypoints, scores))
            dets: dict = {k: [] for k in mine}
            for v in np.unique(where):
                k, x, y, s, view = cut[v]
                rows = where == v
                dets[k] += view_detections(x, y, max(view.shape[:2]), b[rows], kp[rows], sc[rows])
            for k in mine:
                out[k] = nms_detections(dets[k], self.nms)  # as the workers' _decode: one NMS per stage
        return out

    # ---- crops
    @staticmethod
    @torch.inference_mode()
    def crop_clip(frames: torch.Tensor, squares, image_size: int, lda_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, H, W, 3) uint8 frames and squares (``faces.crop_box``) -> images (K, S, S, 3) and
        frames (K, n, s, s, 3), uint8, as ``faces.face_clips`` cuts them with PIL."""
        n = frames.shape[0]
        if not squares:
            return frames.new_zeros((0, image_size, image_size, 3)), frames.new_zeros((0, n, lda_size, lda_size, 3))
        images, lda = [], []
        for square in squares:
            block = _cut(frames, square)  # (n, side, side, 3), black outside the frame
            images.append(pil_resize(block[:1], image_size)[0])
            lda.append(pil_resize(block, lda_size))
        return torch.stack(images), torch.stack(lda)

    def crops(self, clips: torch.Tensor | list[torch.Tensor], squares: list[tuple[int, tuple[int, int, int, int]]],
              image_size: int, lda_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops of ``squares`` ((clip index, square)) of ``clips`` ((n, H, W, 3) each), at the
        given sizes (tests and the GPU script)."""
        if not squares:
            return self.crop_clip(clips[0], [], image_size, lda_size)
        parts = [self.crop_clip(clips[ci], [sq], image_size, lda_size) for ci, sq in squares]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def timed_step(prep: DevicePreparer, clips: list[RawClip]) -> tuple[list[list[DeviceClip]], float]:
    """``prep.step`` and its seconds (synchronised on CUDA, so the time is the device's too)."""
    t = time.perf_counter()
    out = prep.step(clips)
    if prep.device.type == "cuda":
        torch.cuda.synchronize(prep.device)
    return out, time.perf_counter() - t


class DeviceStage:
    """Frames -> face clips on the model's device, for a scan: the one owner of the decoded
    clips waiting (a queue per video, in order) and, through its preparer, of the trackers.
    ``step`` prepares the next clip of every video that has one, in one batch, and gives the
    handles of their frames back to the source."""

    def __init__(self, preparer: DevicePreparer, source):
        self.prep, self.source = preparer, source
        self._raw: dict[int, list] = {}  # input index -> [events.Frames], in order

    def __bool__(self) -> bool:
        return bool(self._raw)

    def add(self, ev) -> None:
        self._raw.setdefault(ev.job.index, []).append(ev)

    def drop(self, index: int) -> int:
        """Forget input ``index`` (it failed): its frames go back; returns how many clips they were."""
        gone = self._raw.pop(index, [])
        self.source.free([ev.slot for ev in gone])
        self.prep.forget(index)
        return len(gone)

    def forget(self, index: int) -> None:
        self.prep.forget(index)

    def reset(self) -> None:
        """A run ended: every frame back to the source, every tracker gone."""
        self.source.free([ev.slot for queue_ in self._raw.values() for ev in queue_])
        self._raw = {}
        self.prep.trackers.clear()

    def step(self) -> list[tuple[int, list[DeviceClip], float]]:
        """One step: (input index, its face clips, its share of the step's seconds) per video."""
        from ..errors import DeepscanError

        dev = self.prep.device
        firsts = [queue_[0] for queue_ in self._raw.values()]
        raws = []
        for ev in firsts:
            meta = ev.meta
            if ev.pixels is not None:  # decoded by NVDEC, on the device already
                frames = ev.pixels
            else:
                frames = torch.from_numpy(self.source.view(ev.slot, meta.shape))
                frames = frames.to(dev, non_blocking=True) if dev.type != "cpu" else frames
            raws.append(RawClip(ev.job.index, meta.clip_index, meta.frame_indices, meta.times, frames))
        try:
            prepared, seconds = timed_step(self.prep, raws)
        except Exception as exc:  # noqa: BLE001 - the device (e.g. out of memory) fails the scan, loudly
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise DeepscanError(f"device preparation failed on {dev} ({type(exc).__name__}: {first}); "
                                "try --preparation workers") from exc
        finally:
            for ev in firsts:  # the crops are new tensors: the frames can go back
                queue_ = self._raw[ev.job.index]
                queue_.pop(0)
                if not queue_:
                    del self._raw[ev.job.index]
            self.source.free([ev.slot for ev in firsts])
        share = seconds / max(1, len(firsts))
        return [(ev.job.index, face_clips, share) for ev, face_clips in zip(firsts, prepared)]


def pin_slots(pool):
    """Page-lock the pool's shared slots for CUDA (cudaHostRegister), so that decoded frames go
    from a slot to the GPU by DMA rather than through a pageable staging copy; returns the undo,
    or None where CUDA declines (then copies are pageable, and slower)."""
    if pool.threaded or not hasattr(torch._C, "_cudart"):
        return None
    try:
        buf = np.frombuffer(pool.block.buf, np.uint8)  # an export: the mapping stays while it lives
        ptr, size = buf.ctypes.data, buf.nbytes
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(ptr, size, 0)) != 0:
            return None
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return None

    def undo() -> None:
        cudart.cudaHostUnregister(ptr)

    undo.export = buf  # held while pinned: the mapping cannot be closed under the registration
    return undo


# ---------------------------------------------------------------------------- PIL's resampling as matrices
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


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # PIL's bicubic
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0), "box": (_box, 0.5)}
_MATRICES: dict = {}
MATRICES_CACHED = 128  # per process: a face crop's side varies; each is <= ~6 MB, made in ~0.1 ms


def _taps(size_in: int, size_out: int, device, filter_name: str,
          box_end: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's resampling filter (Resample.c, precompute_coeffs) from ``size_in`` pixels, over the
    input span [0, box_end) (default: all of it), to ``size_out``: for each output pixel the
    input pixels it reads, (size_out, k) indices, and their weights as PIL's 8-bit fixed point
    (22 fraction bits, normalize_coeffs_8bpc), so that sums in float64 are exact and the rounded
    pass equals PIL's."""
    filt, support = FILTERS[filter_name]
    span = size_in if box_end is None else box_end
    scale = span / size_out
    fscale = max(scale, 1.0)
    support *= fscale
    centre = (np.arange(size_out) + 0.5) * scale
    # C's (int) truncates toward zero; clamped to the image as PIL does
    lo = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(centre + support + 0.5), size_in).astype(np.int64)
    k = max(1, int((hi - lo).max()))
    index = lo[:, None] + np.arange(k)[None, :]
    inside = index < hi[:, None]
    w = np.where(inside, filt((index - centre[:, None] + 0.5) / fscale), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    w = np.where(w < 0, np.trunc(-0.5 + w * (1 << 22)), np.trunc(0.5 + w * (1 << 22)))
    index = np.where(inside, index, 0)  # padding taps read pixel 0 with weight 0
    return torch.from_numpy(index).to(device), torch.from_numpy(w).to(device=device, dtype=torch.float64)


def _dense(size_in: int, size_out: int, device, filter_name: str, box_end: float | None) -> torch.Tensor:
    """``_taps`` as an (out, in) matrix, cached. A pass is one float64 product with
    it: on one CPU thread 38 ms a 720p clip's step against 57 for gathering the taps (a box
    filter reads only ~3 pixels an output, but the product runs at the BLAS's pace), and on a
    GPU a few kernel launches."""
    key = (size_in, size_out, str(device), filter_name, box_end)
    m = _MATRICES.get(key)
    if m is None:
        index, weight = _taps(size_in, size_out, device, filter_name, box_end)
        m = torch.zeros(size_out, size_in, dtype=torch.float64, device=device)
        m.scatter_add_(1, index, weight)  # padding taps add 0 to pixel 0
        if len(_MATRICES) >= MATRICES_CACHED:
            _MATRICES.pop(next(iter(_MATRICES)))  # the oldest
        _MATRICES[key] = m
    return m


def _round8(x: torch.Tensor) -> torch.Tensor:
    """A pass's fixed-point sums to 8 bits as PIL does: (sum + 2^21) >> 22, clipped."""
    return torch.floor_divide(x + (1 << 21), 1 << 22).clamp_(0, 255)


def _pass(x: torch.Tensor, size_out: int, filter_name: str, box_end: float | None) -> torch.Tensor:
    """One of PIL's passes along the last dimension of x (float64 holding 8-bit values)."""
    return _round8(x @ _dense(x.shape[-1], size_out, x.device, filter_name, box_end).T)


def _resample(x: torch.Tensor, out_hw: tuple[int, int], filter_name: str,
              box: tuple[float, float] | None = None) -> torch.Tensor:
    """(B, 3, H, W) float holding 8-bit values -> (B, 3, oh, ow), as PIL's ``resize`` (horizontal
    pass, rounded to 8 bits, then vertical), over the input span (0, 0, box) when given."""
    h, w = x.shape[-2:]
    oh, ow = out_hw
    bw, bh = (None, None) if box is None else box
    x = x.double()
    if ow != w or bw is not None and bw != w:
        x = _pass(x, ow, filter_name, bw)
    if oh != h or bh is not None and bh != h:
        x = _pass(x.transpose(-1, -2), oh, filter_name, bh).transpose(-1, -2)
    return x


def pil_resize(square: torch.Tensor, size: int) -> torch.Tensor:
    """(n, side, side, 3) uint8 -> (n, size, size, 3) uint8, as PIL's ``resize`` in ``faces.
    crop_square`` (bicubic to enlarge, box to reduce)."""
    side = square.shape[1]
    if side == size:
        return square
    x = square.permute(0, 3, 1, 2).float()
    x = _resample(x, (size, size), "bicubic" if side < size else "box")
    return x.to(torch.uint8).permute(0, 2, 3, 1)


def _reduce(x: torch.Tensor, fx: int, fy: int) -> torch.Tensor:
    """PIL's ``Image.reduce((fx, fy))`` of (B, 3, H, W) 8-bit values: the integer mean of each
    block (partial blocks at the right and bottom edges average what they hold), rounded as
    Reduce.c does ((sum + n/2) * floor(2^24 / n) >> 24)."""
    h, w = x.shape[-2:]
    sums = F.avg_pool2d(x, (fy, fx), stride=(fy, fx), ceil_mode=True, divisor_override=1)
    cy = torch.tensor([min(fy, h - i * fy) for i in range(sums.shape[-2])], device=x.device)
    cx = torch.tensor([min(fx, w - i * fx) for i in range(sums.shape[-1])], device=x.device)
    n = (cy[:, None] * cx[None, :]).to(torch.int64)
    # Reduce.c's multiplier, computed in float32 as there ((1 << 30) * 4.0 / (256 * n))
    mult = (torch.full_like(n, 2 ** 32, dtype=torch.float32) / (256 * n).float()).to(torch.int64)
    return (((sums.round().to(torch.int64) + n // 2) * mult) >> 24).float()


def letterbox_many(views: list[torch.Tensor], size: int) -> torch.Tensor:
    """Each (h, w, 3) uint8 view scaled to fit a ``size`` square (top-left, black padding), as
    ``blazeface.letterbox`` does with PIL (``reducing_gap=2``: an integer reduction first, then
    bilinear over the reduced image's fractional box) -> (B, size, size, 3) float. Views of one
    shape (the whole frames of a folder of one resolution) are resampled together."""
    out = views[0].new_zeros((len(views), size, size, 3), dtype=torch.float32)
    groups: dict = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[:2]), []).append(i)
    for (h, w), idx in groups.items():
        scale = size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        x = torch.stack([views[i] for i in idx]).permute(0, 3, 1, 2).float()
        if (nw, nh) != (w, h):
            fx, fy = int(w / nw / 2.0) or 1, int(h / nh / 2.0) or 1
            box = None
            if fx > 1 or fy > 1:
                x = _reduce(x, fx, fy)
                box = (float(np.float32(w / fx)), float(np.float32(h / fy)))  # PIL parses a box as C floats
            x = _resample(x, (nh, nw), "bilinear", box)
        out[idx, :nh, :nw] = x.permute(0, 2, 3, 1).float()
    return out
