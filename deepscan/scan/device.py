"""Preparation on a torch device (``--preparation device``): detection, tracking and crops of
clips whose frames the workers (or NVDEC) only decoded, batched over the frames of many videos.

The workers hand over each sampled clip's frames (``PrepSettings.handover == "frames"``); the
scanning process moves them to the device and, for the next clip of every video in flight at
once, runs BlazeFace's staged search (the same generator, ``faces.blazeface_search``, drives the
workers' detector, so both take the same decisions), links the faces to tracks on the CPU (a
few boxes), and cuts the model's crops on the device, straight into its batch.

At the GPU's pace (issue 32), a step's device work is a fixed number of operations whatever the
number of faces: each detection round letterboxes all its views in one batched product
(``resample``), pads them to one of DETECT_BUCKETS views per network (each warmed at start in the
thread that runs it), keeps each view's TOP_ANCHORS best anchors with a fixed-size top-k (no
``nonzero``), and brings them to the host in one copy; the crops of every face of the step are
one gather and two batched products per output size. The only host synchronisations of a step
are those copies, one per detection round (``fetches`` counts them); the frames' slots go back to
the workers when a CUDA event says their copy is over, not after a ``synchronize``.

Why resampling is written by hand: see ``resample``. A device crop equals PIL's to the bit.

It runs on the CPU too (``--device cpu --preparation device``), which is how the suite checks
it against the workers; on a CPU the workers are faster (docs/performance.md).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import faces as faces_mod
from ..faces import Detection, Tracker, blazeface_search, crop_box, filter_faces, nms_detections, view_detections
from . import resample

# Views per network call, padded up to one of these (cuDNN plans are made per input shape, and per
# thread: every bucket is warmed in the thread that detects, before its first step). A round with
# more views than the largest runs in chunks of it.
DETECT_BUCKETS = (16, 64, 256)
# Anchors of a view brought to the host: its best ones by score (a face lights 5-20 anchors). A
# view with more above the threshold than this has all of them fetched again (``refetches``).
TOP_ANCHORS = 48
# Gathered windows round their sides up to a multiple of this (fewer matrix shapes)
WINDOW_STEP = 64
# Whole-frame passes want this many frames per detection step: a scan on a GPU keeps at least
# this many videos in flight (``pipeline.Scanner.window``)
DETECT_FRAMES = 64


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


def bucket(n: int, buckets: tuple[int, ...] = DETECT_BUCKETS) -> int:
    """The smallest of ``buckets`` holding ``n`` (the largest when none does: chunks of it)."""
    return next((b for b in buckets if b >= n), buckets[-1])


class DevicePreparer:
    """BlazeFace (full and short range), tracking and square face crops, on ``device``, batched.

    ``step`` takes the next clip of any number of videos and returns their face clips; a video's
    tracker lives here from its first clip until ``forget``. With fixed shapes (the default on
    CUDA) detector calls are padded to DETECT_BUCKETS. ``fetches`` counts the copies to the
    host (one per detection round), ``refetches`` the views whose anchors overflowed TOP_ANCHORS,
    ``warmed`` the (thread, network, views) of the warm-up; ``calls`` counts network calls by
    (near, views), ``frames_per_step`` steps by clips."""

    def __init__(self, device: torch.device | str = "cpu", *, image_size: int = 398, lda_size: int = 224,
                 margin: float | None = None, min_face: int = faces_mod.MIN_FACE, threshold: float = 0.5,
                 nms: float = 0.3, fixed_shapes: bool | None = None):
        from ..blazeface import VARIANTS, build
        from ..config import CROP_MARGIN

        self.device = torch.device(str(device))  # also hardware.CPU
        if self.device.type == "cuda":
            # TF32 convolutions moved BlazeFace's top anchor against the CPU's (14 px on a 720p
            # frame, 2026-12-04): the detector is small, its fp32 is cheap. cuDNN's flag is global,
            # so an fp32 model on this GPU runs without TF32 too (bf16, CUDA's default, is unaffected).
            torch.backends.cudnn.allow_tf32 = False
        self.nets = {False: build("full").to(self.device).eval(), True: build("short").to(self.device).eval()}
        self.sizes = {False: VARIANTS["full"].size, True: VARIANTS["short"].size}
        self.threshold, self.nms = threshold, nms
        self.image_size, self.lda_size = image_size, lda_size
        self.margin = CROP_MARGIN if margin is None else margin
        self.min_face = min_face
        self.trackers: dict = {}
        # padded calls pay off where plans are made per shape (CUDA); on a CPU they only cost
        self.fixed_shapes = self.device.type == "cuda" if fixed_shapes is None else fixed_shapes
        self.fetches = self.refetches = 0
        self.warmed: set = set()
        self.calls: Counter = Counter()
        self.frames_per_step: Counter = Counter()
        # whole-frame answers found ahead, (key, clip index) -> faces: a clip that searches the
        # whole frame first (``workers.search_flags``'s ``full``) needs no tracker for that pass,
        # so it joins an earlier step's first round while its video's earlier clips are prepared
        self.ahead: dict = {}
        self.looked_ahead = self.used_ahead = 0

    # ---- a scan's step
    @torch.inference_mode()
    def step(self, clips: list[RawClip], later=()) -> list[list[DeviceClip]]:
        """The face clips of each of ``clips`` (at most one per video: a video's search depends on
        its tracker after the clip before), detected in stages batched across them, as the
        workers do it (``workers.prepare_video``); every face of the step cut in one batch.
        ``later``: (key, clip index, first frame) of clips still waiting whose whole-frame pass
        can go now (``ahead``), in this step's first round."""
        from .workers import search_flags

        self.frames_per_step[len(clips)] += 1
        items = []
        for c in clips:
            tracker = self.trackers.setdefault(c.key, Tracker())
            flags = search_flags(c.index)
            items.append((c.frames[0], tracker.recent(), tracker.active(), flags["deep"], flags["full"],
                          flags["crowd"], (c.key, c.index)))
        found = self.search(items, later)
        picked, squares = [], []
        for ci, (c, dets) in enumerate(zip(clips, found)):
            dets = filter_faces(dets, self.min_face)
            ids = self.trackers[c.key].assign(dets)
            picked.append((dets, ids))
            squares += [(ci, crop_box(d.box, self.margin)) for d in dets]
        images, frames = self.crops([c.frames for c in clips], squares, self.image_size, self.lda_size)
        out, j = [], 0
        for c, (dets, ids) in zip(clips, picked):
            mine = []
            for d, tid in zip(dets, ids):
                mine.append(DeviceClip(c.key, tid, c.index, c.frame_indices[0], c.times[0], d.box, images[j],
                                       frames[j], d.score))
                j += 1
            out.append(mine)
        return out

    def forget(self, key) -> None:
        self.trackers.pop(key, None)
        for k in [k for k in self.ahead if k[0] == key]:
            del self.ahead[k]

    def clear(self) -> None:
        """Every tracker and answer found ahead gone (a run ended)."""
        self.trackers.clear()
        self.ahead.clear()

    # ---- detection
    def search(self, items, later=()) -> list[list[Detection]]:
        """Faces in each frame of ``items`` ((frame, hints, follow, deep, full[, crowd[, key]]):
        frames (H, W, 3) uint8 on the device, of any sizes), by ``faces.blazeface_search``'s
        stages: every round takes the next stage of each frame still searching, in one batch per
        network. A whole-frame pass found ahead for an item's ``key`` is used, not run again;
        ``later`` ((key, clip index, frame)) join the first round and are kept in ``ahead``."""
        from ..blazeface import VARIANTS

        size = VARIANTS["full"].size
        gens, asks, out = {}, {}, [None] * len(items)
        for i, (frame, hints, follow, deep, full, *rest) in enumerate(items):
            h, w = frame.shape[:2]
            gens[i] = blazeface_search(h, w, size, hints, follow=follow, deep=deep, min_face=self.min_face, full=full,
                                       crowd=rest[0] if rest else None)
            ask = next(gens[i])  # every search looks at something first
            key = rest[1] if len(rest) > 1 else None
            if key in self.ahead and ask == ([(0, 0, max(h, w))], False):  # found ahead: the round is done
                self.used_ahead += 1
                try:
                    ask = gens[i].send(self.ahead.pop(key))
                except StopIteration as done:
                    out[i] = done.value
                    continue
            asks[i] = ask
        extra = [((key, index), (frame, [(0, 0, max(frame.shape[:2]))], False)) for key, index, frame in later]
        while asks or extra:
            keys = list(asks)
            answers = self.run_views([(items[i][0], *asks[i]) for i in keys] + [e[1] for e in extra])
            for (key, _), found in zip(extra, answers[len(keys):]):
                self.ahead[key] = found
            self.looked_ahead += len(extra)
            extra, asks = [], {}
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
    def warm(self) -> None:
        """Every network at every bucket once in the calling thread (the one that will detect):
        cuDNN's plans and the allocator's blocks are made here, not in the first videos' steps."""
        me = threading.current_thread().name
        for near, net in self.nets.items():
            size = self.sizes[near]
            for b in DETECT_BUCKETS:
                if (me, near, b) not in self.warmed:
                    net(torch.zeros((b, size, size, 3), device=self.device))
                    self.warmed.add((me, near, b))

    @torch.inference_mode()
    def run_views(self, asks: list[tuple[torch.Tensor, list, bool]]) -> list[list[Detection]]:
        """Faces in the square views (x, y, side) of each (frame, views, near): the views of each
        network letterboxed in one batch, run in DETECT_BUCKETS-sized calls, their best anchors
        brought to the host in one copy for the round."""
        out: list = [[] for _ in asks]
        packs, rows, outputs, starts = [], [], [], [0]
        for near in (False, True):
            mine = [k for k, (_, views, n) in enumerate(asks) if n == near and views]
            if not mine:
                continue
            size, net = self.sizes[near], self.nets[near]
            frames = [asks[k][0] for k in mine]
            cut = []  # (ask, x, y, factor) per view, in the order of the letterboxed batch
            spans = []  # (frame, x, y, h, w): the view's extent inside its frame
            for fi, k in enumerate(mine):
                h, w = asks[k][0].shape[:2]
                for x, y, s in asks[k][1]:
                    vh, vw = max(0, min(s, h - y)), max(0, min(s, w - x))
                    cut.append((k, x, y, max(vh, vw)))
                    spans.append((fi, x, y, vh, vw))
            pixels = letterbox_batch(frames, spans, size)
            top = min(TOP_ANCHORS, net.anchors.shape[0])
            for a in range(0, len(cut), DETECT_BUCKETS[-1]):
                chunk = pixels[a:a + DETECT_BUCKETS[-1]]
                b = bucket(len(chunk)) if self.fixed_shapes else len(chunk)
                if b > len(chunk):
                    chunk = torch.cat([chunk, chunk.new_zeros((b - len(chunk), *chunk.shape[1:]))])
                self.calls[(near, b)] += 1
                boxes, keypoints, scores = net(chunk)
                best, anchor = scores.topk(top, dim=1)  # (b, top): a fixed size, no nonzero
                pick = anchor[..., None]
                packs.append(torch.cat([best[..., None].float(), anchor[..., None].float(),
                                        boxes.gather(1, pick.expand(-1, -1, 4)).float(),
                                        keypoints.reshape(b, -1, 12).gather(1, pick.expand(-1, -1, 12)).float()], -1))
                n = min(DETECT_BUCKETS[-1], len(cut) - a)
                rows += [(cut[a + v], len(outputs), starts[-1] + v) for v in range(n)]
                outputs.append((boxes, keypoints, scores))
                starts.append(starts[-1] + b)
        if not packs:
            return out
        # the round's one copy to the host (a fixed size per chunk)
        host = self._fetch(torch.cat(packs))
        dets: dict = {}
        for (k, x, y, factor), o, r in rows:
            pack = host[r]
            keep = pack[:, 0] >= self.threshold
            if keep.all() and pack.shape[0] < outputs[o][2].shape[1]:  # more anchors above it than fetched
                b, kp, sc = self._refetch(outputs[o], r - starts[o])
            else:
                sel = pack[keep]
                sel = sel[np.argsort(sel[:, 1], kind="stable")]  # anchor order, as the workers' decoder sees them
                b, kp, sc = sel[:, 2:6], sel[:, 6:18].reshape(-1, 6, 2), sel[:, 0]
            dets.setdefault(k, []).extend(view_detections(x, y, factor, b, kp, sc))
        for k, found in dets.items():
            out[k] = nms_detections(found, self.nms)  # as the workers' _decode: one NMS per stage
        return out

    def _fetch(self, t: torch.Tensor) -> np.ndarray:
        """The one way detection results reach the host (counted: a host synchronisation on a GPU)."""
        self.fetches += 1
        return t.cpu().numpy()

    def _refetch(self, output, v: int):
        """Every anchor of view ``v`` above the threshold (its top-k overflowed; rare)."""
        self.refetches += 1
        boxes, keypoints, scores = (self._fetch(t[v].float()) for t in output)
        keep = scores >= self.threshold
        return boxes[keep], keypoints[keep], scores[keep]

    # ---- crops
    @torch.inference_mode()
    def crops(self, clips: list[torch.Tensor], squares: list[tuple[int, tuple[int, int, int, int]]],
              image_size: int, lda_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops of ``squares`` ((clip index, square as ``faces.crop_box``)) of ``clips`` ((n, H, W,
        3) uint8 each) -> images (K, S, S, 3) from each clip's first frame and frames (K, n, s, s,
        3), uint8, as ``faces.face_clips`` cuts them with PIL: a fixed number of operations per
        frame size, whatever K."""
        return crop_batch(clips, squares, image_size, lda_size)

    @staticmethod
    def crop_clip(frames: torch.Tensor, squares, image_size: int, lda_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops of ``squares`` of one clip (see ``crops``)."""
        return crop_batch([frames], [(0, sq) for sq in squares], image_size, lda_size)


def timed_step(prep: DevicePreparer, clips: list[RawClip], later=()) -> tuple[list[list[DeviceClip]], float]:
    """``prep.step`` and its host seconds (each detection round waits for its results; the crops
    may still be running on a GPU when it returns: the model's stream waits for them)."""
    t = time.perf_counter()
    out = prep.step(clips, later)
    return out, time.perf_counter() - t


class DeviceStage:
    """Frames -> face clips on the model's device, for a scan: the one owner of the decoded
    clips waiting (a queue per video, in order) and, through its preparer, of the trackers.
    ``step`` prepares the next clip of every video that has one, in one batch. The frames' slots
    go back to the source once their copy to the device is over: on a GPU when a CUDA event
    recorded after the copies has passed (``release``), on the CPU after the step."""

    def __init__(self, preparer: DevicePreparer, source):
        self.prep, self.source = preparer, source
        self._raw: dict[int, list] = {}  # input index -> [events.Frames], in order
        self._held: list = []  # (event, slots) whose copies may still be running

    def __bool__(self) -> bool:
        return bool(self._raw)

    @property
    def holding(self) -> bool:
        """Slots wait for their copies to end (the loop must come back soon to ``release`` them)."""
        return bool(self._held)

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

    def _later(self, dev) -> list:
        """(key, clip index, first frame on the device) of waiting clips, behind each video's next,
        whose whole-frame pass can go in this step (``DevicePreparer.search``): at most
        DETECT_FRAMES."""
        from .workers import search_flags

        out = []
        for index, queue_ in self._raw.items():
            for ev in queue_[1:]:
                key = (index, ev.meta.clip_index)
                if len(out) >= DETECT_FRAMES:
                    return out
                if key in self.prep.ahead or not search_flags(ev.meta.clip_index)["full"]:
                    continue
                if ev.pixels is not None:
                    frame = ev.pixels[0]
                else:
                    frame = torch.from_numpy(self.source.view(ev.slot, ev.meta.shape)[0])
                frame = frame.to(dev, non_blocking=True) if frame.device != dev else frame
                out.append((index, ev.meta.clip_index, frame))
        return out

    def release(self, wait: bool = False) -> None:
        """Slots whose copies are over go back (with ``wait``, all of them, after waiting)."""
        keep = []
        for event, slots in self._held:
            if wait:
                event.synchronize()
            if wait or event.query():
                self.source.free(slots)
            else:
                keep.append((event, slots))
        self._held = keep

    def reset(self) -> None:
        """A run ended: every frame back to the source, every tracker gone."""
        self.release(wait=True)
        self.source.free([ev.slot for queue_ in self._raw.values() for ev in queue_])
        self._raw = {}
        self.prep.clear()

    def step(self) -> list[tuple[int, list[DeviceClip], float]]:
        """One step: (input index, its face clips, its share of the step's seconds) per video."""
        from ..errors import DeepscanError

        dev = self.prep.device
        self.release()
        firsts = [queue_[0] for queue_ in self._raw.values()]
        raws = []
        for ev in firsts:
            meta = ev.meta
            if ev.pixels is not None:  # decoded by NVDEC, on a GPU already
                frames = ev.pixels
                if frames.device != dev:  # NVDEC decodes on the first GPU; this home is another
                    frames = frames.to(dev, non_blocking=True)
                elif frames.device.type == "cuda":  # made on a decoder thread's stream, read on this one's
                    frames.record_stream(torch.cuda.current_stream(frames.device))
            else:
                frames = torch.from_numpy(self.source.view(ev.slot, meta.shape))
                frames = frames.to(dev, non_blocking=True) if dev.type != "cpu" else frames
            raws.append(RawClip(ev.job.index, meta.clip_index, meta.frame_indices, meta.times, frames))
        later = self._later(dev)
        slots = [ev.slot for ev in firsts]
        if dev.type == "cuda" and slots:  # the copies are queued: their slots go back when they are done
            event = torch.cuda.Event()
            event.record()
            self._held.append((event, slots))
            slots = []
        try:
            prepared, seconds = timed_step(self.prep, raws, later)
        except Exception as exc:  # noqa: BLE001 - the device (e.g. out of memory) fails the scan, loudly
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise DeepscanError(f"device preparation failed on {dev} ({type(exc).__name__}: {first}); "
                                "try --preparation workers") from exc
        finally:
            for ev in firsts:  # the crops are new tensors: on the CPU the frames can go back now
                queue_ = self._raw[ev.job.index]
                queue_.pop(0)
                if not queue_:
                    del self._raw[ev.job.index]
            self.source.free(slots)
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
        if int(cudart.cudaHostRegister(ptr, size, 1)) != 0:  # cudaHostRegisterPortable: every GPU's
            return None
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return None

    def undo() -> None:
        cudart.cudaHostUnregister(ptr)

    undo.export = buf  # held while pinned: the mapping cannot be closed under the registration
    return undo


# ---------------------------------------------------------------------------- batched PIL resampling
def _upload(rows: list[tuple], device: torch.device) -> torch.Tensor:
    """Per-item numbers (ints and floats, float64 holds both exactly) to the device in one copy:
    from pinned memory and asynchronous on a GPU (no host synchronisation)."""
    t = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), -1)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _span(n: int) -> int:
    return max(WINDOW_STEP, -(-n // WINDOW_STEP) * WINDOW_STEP)


def _windows(stack: torch.Tensor, index: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, lh: int,
             lw: int) -> torch.Tensor:
    """(F, n, H, W, 3) uint8 frames -> each item's lh x lw window at (x0, y0) of frame ``index``,
    (B, n * 3, lh, lw) float32; coordinates outside the frame read its edge (the weights give
    them 0: black)."""
    h, w = stack.shape[2:4]
    rows = (y0[:, None] + torch.arange(lh, device=stack.device)).clamp(0, h - 1)
    cols = (x0[:, None] + torch.arange(lw, device=stack.device)).clamp(0, w - 1)
    win = stack[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, lh, lw, n, 3)
    return win.permute(0, 3, 4, 1, 2).reshape(len(index), -1, lh, lw).float()


def _groups(shapes: list[tuple]) -> dict:
    out: dict = {}
    for i, s in enumerate(shapes):
        out.setdefault(tuple(s), []).append(i)
    return out


def _in_order(parts: list[torch.Tensor], order: list[int], device) -> torch.Tensor:
    """Rows of ``parts`` (concatenated) put back in the callers' order (``order``: each row's place)."""
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if order != sorted(order):
        back = np.argsort(order)
        out = out.index_select(0, _upload([(int(i),) for i in back], device)[:, 0].long())
    return out


def letterbox_batch(frames: list[torch.Tensor], spans: list[tuple[int, int, int, int, int]], size: int) -> torch.Tensor:
    """Views of ``frames`` ((H, W, 3) uint8, any sizes): ``spans`` (frame, x, y, h, w), each scaled to
    fit a ``size`` square (top-left, black padding), as ``blazeface.letterbox`` does with PIL
    (``reducing_gap=2``: an integer reduction, then bilinear over the reduced image's fractional
    box) -> (V, size, size, 3) float32. One gather and four products per frame size."""
    device = frames[0].device
    params = []
    for fi, x, y, h, w in spans:
        h, w = max(h, 1), max(w, 1)
        scale = size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        fx, fy = (1, 1) if (nw, nh) == (w, h) else (int(w / nw / 2.0) or 1, int(h / nh / 2.0) or 1)
        # PIL parses the reduced image's box as C floats
        params.append((fi, x, y, h, w, fx, fy, -(-w // fx), -(-h // fy), float(np.float32(w / fx)),
                       float(np.float32(h / fy)), nw, nh))
    by_shape = _groups([frames[p[0]].shape for p in params])
    parts, order = [], []
    for (fh, fw, _), idx in by_shape.items():
        mine = [params[i] for i in idx]
        local = {fi: j for j, fi in enumerate(dict.fromkeys(p[0] for p in mine))}
        stack = torch.stack([frames[fi] for fi in local])[:, None]  # (F, 1, H, W, 3)
        p = _upload([(local[q[0]], *q[1:]) for q in mine], device)
        i64 = p.long()
        lh, lw = _span(max(q[3] for q in mine)), _span(max(q[4] for q in mine))
        rh, rw = max(q[8] for q in mine), max(q[7] for q in mine)
        x = _windows(stack, i64[:, 0], i64[:, 2], i64[:, 1], lh, lw)  # (V, 3, lh, lw)
        x = resample.reduce(x, resample.blocks(i64[:, 4], i64[:, 5], rw, lw), resample.blocks(i64[:, 3], i64[:, 6], rh, lh))
        horizontal = resample.taps(i64[:, 7], p[:, 9], i64[:, 11], size, rw, "bilinear")
        vertical = resample.taps(i64[:, 8], p[:, 10], i64[:, 12], size, rh, "bilinear")
        parts.append(resample.resize(x, horizontal, vertical).permute(0, 2, 3, 1).contiguous())  # (NHWC, as PIL's)
        order += idx
    return _in_order(parts, order, device)


def letterbox_many(views: list[torch.Tensor], size: int) -> torch.Tensor:
    """Each (h, w, 3) uint8 view letterboxed into a ``size`` square (``letterbox_batch``)."""
    return letterbox_batch(views, [(i, 0, 0, *v.shape[:2]) for i, v in enumerate(views)], size)


def crop_batch(clips: list[torch.Tensor], squares: list[tuple[int, tuple[int, int, int, int]]], image_size: int,
               lda_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each square of its clip (``faces.crop_square``: black outside the frame), resized as PIL's
    ``resize`` does in ``faces.crop_square`` (bicubic to enlarge, box to reduce): the first frame to
    ``image_size``, every frame to ``lda_size`` -> (K, S, S, 3) and (K, n, s, s, 3) uint8."""
    n = clips[0].shape[0] if len(clips) else 1
    if not squares:
        ref = clips[0] if len(clips) else torch.zeros((1, 1, 1, 3), dtype=torch.uint8)
        return (ref.new_zeros((0, image_size, image_size, 3)), ref.new_zeros((0, n, lda_size, lda_size, 3)))
    device = clips[0].device
    by_shape = _groups([clips[ci].shape for ci, _ in squares])
    images, lda, order = [], [], []
    for (_, fh, fw, _), idx in by_shape.items():
        mine = [squares[i] for i in idx]
        local = {ci: j for j, ci in enumerate(dict.fromkeys(ci for ci, _ in mine))}
        stack = torch.stack([clips[ci] for ci in local])  # (C, n, H, W, 3)
        rows = [(local[ci], x1, y1, x2 - x1, x2 - x1 < image_size, x2 - x1 < lda_size) for ci, (x1, y1, x2, _) in mine]
        p = _upload(rows, device).long()
        side = p[:, 3]
        span = _span(max(r[3] for r in rows))
        x = _windows(stack, p[:, 0], p[:, 2], p[:, 1], span, span)  # (K, n * 3, L, L)
        at = torch.arange(span, device=device)
        inside_x = ((p[:, 1:2] + at) >= 0) & ((p[:, 1:2] + at) < fw)
        inside_y = ((p[:, 2:3] + at) >= 0) & ((p[:, 2:3] + at) < fh)
        for out, size, part, bicubic in ((images, image_size, x[:, :3], p[:, 4]),
                                         (lda, lda_size, x, p[:, 5])):
            # one filter each (bicubic to enlarge, box to reduce), both directions alike but for
            # where the square leaves the frame
            w = resample.taps(side, side, torch.full_like(side, size), size, span, ("bicubic", "box"), bicubic.bool())
            y = resample.resize(part, w * inside_x[:, None, :], w * inside_y[:, None, :])  # (K, c, S, S)
            out.append(y.reshape(len(mine), -1, 3, size, size).permute(0, 1, 3, 4, 2).to(torch.uint8))
        order += idx
    return _in_order(images, order, device)[:, 0], _in_order(lda, order, device)


def pil_resize(square: torch.Tensor, size: int) -> torch.Tensor:
    """(n, side, side, 3) uint8 -> (n, size, size, 3) uint8, as PIL's ``resize`` in ``faces.
    crop_square`` (bicubic to enlarge, box to reduce)."""
    side = square.shape[1]
    _, frames = crop_batch([square], [(0, (0, 0, side, side))], size, size)
    return frames[0]
