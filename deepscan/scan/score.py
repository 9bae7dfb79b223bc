"""The model's runners: face clips in, P(fake) and attention maps out, in batches. ``Runner``
is torch's (eager or torch.compile); ``score_openvino.OpenVinoRunner`` has the same interface
(``score_batch``, ``cfg``, ``device``, ``threads``, ``replica``), and ``make_runner`` picks one.
The threads that drive them are the lanes (``lanes``).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections import Counter
from typing import Callable, NamedTuple, Protocol

import numpy as np
import torch

from .. import faces as faces_mod
from ..errors import ConfigError
from ..model import LDADetector, fold_batchnorm, input_normaliser

# A CPU lane scores its batch one clip at a time: as fast as larger steps on one thread (model
# alone, 2 lanes, clips/s at steps of 1/2/4/8: 4.83-5.25 / 4.73-4.99 / 4.68-4.79 / 4.53-4.55), and
# the activations of two lanes peak at +250 MB instead of +457 MB (steps of 2) or +1336 MB (8).
CPU_STEP = 1
# On a GPU a batch of any size would make new cuDNN plans (and allocator blocks) for each new size
# in each thread: the model sees these fractions of --batch-size at most, padded up (64: 8, 16, 32,
# 64), each warmed at start in the lane thread that runs it (issue 32: fixed shapes).
SHAPE_FRACTIONS = (8, 4, 2, 1)


def batch_shapes(batch_size: int) -> tuple[int, ...]:
    """The batch sizes a fixed-shape runner runs: ``batch_size`` / 8, / 4, / 2 and itself."""
    return tuple(sorted({max(1, -(-batch_size // f)) for f in SHAPE_FRACTIONS}))


def shape_for(n: int, shapes: tuple[int, ...]) -> int:
    """The smallest of ``shapes`` that holds ``n`` clips (the largest when none does: a batch is
    never larger than --batch-size, whose shape is the largest)."""
    return next((s for s in shapes if s >= n), shapes[-1])


class Launched(NamedTuple):
    """A batch queued on the device: its outputs (host tensors, being filled on CUDA) and the
    event after which they are whole (None: they are already)."""

    outputs: dict
    done: object


class ModelRunner(Protocol):
    """What a lane needs of a runner (``Runner``, ``score_openvino.OpenVinoRunner``)."""

    cfg: object
    device: torch.device
    threads: int

    def score_batch(self, images, frames) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


class Runner:
    """Face clips -> P(fake) and attention maps, in batches, on one device and precision.

    With ``use_compile``, the model goes through torch.compile (inductor, weights frozen on CPU) the
    first time it runs; batches are padded to ``batch_size`` so that one graph serves them all.
    Should compilation fail (no C++ compiler, an unsupported GPU...), the runner says so through
    ``say`` and carries on uncompiled.

    With fixed shapes (the default on CUDA; ``fixed_shapes`` forces it either way), a batch is
    padded to one of ``batch_shapes(batch_size)``; ``warm()``, which each lane calls in its own
    thread before its first batch, runs every shape once there. ``warmed`` holds (thread name,
    batch) of each warm-up run, ``shapes_run`` (thread name, batch) of every batch run since.
    On CUDA the host side of a batch goes through a pinned staging buffer per lane thread and
    shape, made once (``_stage``), not a new pinned tensor per batch."""

    backend = "torch"

    def __init__(self, model: LDADetector, device: torch.device, dtype: torch.dtype, *,
                 use_compile: bool = False, batch_size: int = 8, say: Callable[[str], None] | None = None,
                 fixed_shapes: bool | None = None):
        self.cfg = model.config
        device = torch.device(str(device))  # also hardware.CPU, the stand-in of a process without torch
        self.device, self.dtype = device, dtype
        # The runner owns the model: batch norms are folded into their convolutions in place.
        self.model = fold_batchnorm(model.to(device))
        if device.type == "cpu" or dtype != torch.float32:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._to_input = input_normaliser(self.cfg, device, pin=False)  # (pinned here: ``_stage``)
        self.batch_size, self.say = batch_size, say
        self.fixed_shapes = device.type == "cuda" if fixed_shapes is None else fixed_shapes
        self.shapes = (batch_size,) if use_compile else batch_shapes(batch_size)
        self.warmed: set[tuple[str, int]] = set()
        self.shapes_run: set[tuple[str, int]] = set()
        self.batch_sizes: Counter = Counter()  # clips per batch as they came, before padding
        self._local = threading.local()  # per lane thread: pinned staging buffers by shape
        self._pin_failed = False
        self._forward = compile_model(self.model, device) if use_compile else self.model
        self.compiled = use_compile
        self.threads = torch.get_num_threads()  # CPU threads, as set where the runner is made
        self._first = threading.Lock() if use_compile else None  # several lanes: compile once

    def forward(self, image: torch.Tensor, frames: torch.Tensor | None):
        """(logits, maps) for normalised inputs, compiled when asked and possible. The first call
        compiles; lanes that call meanwhile wait for it rather than compile again."""
        first = self._first
        if first is not None:
            with first:
                out = self._call(image, frames)
                self._first = None
                return out
        return self._call(image, frames)

    def _call(self, image: torch.Tensor, frames: torch.Tensor | None):
        try:
            return self._forward(image, frames, return_maps=True)
        except Exception as exc:  # noqa: BLE001 - any compiler failure; eager is always there
            if not self.compiled:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if self.say:
                self.say(f"note: --compile failed ({type(exc).__name__}: {first}); running uncompiled")
            self._forward, self.compiled = self.model, False
            return self.model(image, frames, return_maps=True)

    @torch.inference_mode()
    def score(self, images: np.ndarray, frames: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """uint8 crops, images (B, S, S, 3) and frames (B, n, s, s, 3) -> P(fake) (B,) and maps."""
        return self.collect(self.launch(images, frames))

    @torch.inference_mode()
    def launch(self, images, frames, ready=None) -> "Launched":
        """Queue a batch (``score``'s arguments): on CUDA its results come back to pinned host
        memory asynchronously, so a lane can queue its next batch before it waits for this one
        (``collect``). ``ready``: a CUDA event after which the crops cut on the device are whole
        (they were made on the preparation's stream)."""
        if self.cfg.variant == "xception":
            frames = None
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in (images, frames):
                if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                    t.record_stream(stream)  # made on another stream: not reused before this one is done
        n = len(images)
        if self.compiled or self.fixed_shapes:  # a shape the graph (or the warm-up) knows
            size = shape_for(n, self.shapes)
            if n < size:
                images = _pad(images, size)
                frames = None if frames is None else _pad(frames, size)
        self.shapes_run.add((threading.current_thread().name, len(images)))
        self.batch_sizes[n] += 1
        in_lane = getattr(self._local, "in_lane", False)  # a lane entered autocast once, for all its batches
        autocast = self.dtype != torch.float32 and not in_lane
        with torch.autocast(self.device.type, dtype=self.dtype) if autocast else contextlib.nullcontext():
            logits, maps = self.forward(self._to_input(self._stage(images)),
                                        None if frames is None else self._to_input(self._stage(frames)))
        out = {"probs": torch.softmax(logits[:n].float(), dim=1)[:, 1], **{k: v[:n].float() for k, v in maps.items()}}
        if self.device.type != "cuda":
            return Launched(out, None)
        try:
            host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=not self._pin_failed) for k, v in out.items()}
        except RuntimeError:
            return Launched({k: v.cpu() for k, v in out.items()}, None)
        for k, v in out.items():
            host[k].copy_(v, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Launched(host, done)

    @staticmethod
    def collect(launched: "Launched") -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A launched batch's P(fake) and maps, once its copies to the host are over."""
        if launched.done is not None:
            launched.done.synchronize()
        out = dict(launched.outputs)
        probs = out.pop("probs").numpy()
        return probs, {k: v.numpy() for k, v in out.items()}

    def lane(self):
        """What a lane holds while it runs (entered once, in its thread, around its warm-up and
        every batch): on CUDA a stream of its own, so that its batches overlap the device
        preparation's work and the other lanes'; inference mode; autocast at the runner's
        precision (entered here once, not per batch)."""
        stack = contextlib.ExitStack()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            stack.enter_context(torch.cuda.stream(torch.cuda.Stream(self.device)))
        stack.enter_context(torch.inference_mode())
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
            self._local.in_lane = True
            stack.callback(setattr, self._local, "in_lane", False)
        return stack

    def _stage(self, batch):
        """A numpy batch bound for CUDA, copied into one of this thread's two pinned buffers of its
        shape (made on first use, used in turn: a lane has at most one batch in flight besides the
        one it queues, ``lanes.Scorer``). Should pinning fail (a locked-memory limit), said once;
        the batch then goes from pageable memory."""
        if self.device.type != "cuda" or isinstance(batch, torch.Tensor) or self._pin_failed:
            return batch
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        key = (batch.shape[1:], batch.dtype.str)  # buffers of the largest batch; smaller ones use their head
        pair = buffers.get(key)
        if pair is None or len(pair[0]) < len(batch):
            try:
                size = max(len(batch), self.shapes[-1])
                pair = buffers[key] = [torch.empty((size, *batch.shape[1:]),
                                                   dtype=torch.from_numpy(batch[:0]).dtype).pin_memory()
                                       for _ in range(2)]
            except RuntimeError as exc:
                self._pin_failed = True
                if self.say:
                    self.say(f"note: pinned host memory is not available ({str(exc).splitlines()[0][:160]}); "
                             "batches go to the GPU from pageable memory (slower copies)")
                return batch
        buf = pair[0]
        pair.reverse()  # the other one next time
        head = buf[:len(batch)]
        head.numpy()[...] = batch
        return head

    def warm(self) -> None:
        """Run every batch shape once in the calling thread (a lane's, before its first batch):
        cuDNN's plans and the allocator's blocks are made here, not in the first videos' batches."""
        if not self.fixed_shapes:  # (a CPU graph compiles on its first batch, as it always has)
            return
        s, c = self.cfg.image_size, self.cfg
        for size in self.shapes:
            images = np.zeros((size, s, s, 3), np.uint8)
            frames = np.zeros((size, c.clip_len, c.lda_size, c.lda_size, 3), np.uint8)
            self.score(images, frames)
            self.batch_sizes[size] -= 1  # the histogram is of the scan's batches
            self.warmed.add((threading.current_thread().name, size))

    def score_batch(self, images: np.ndarray, frames: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``score`` over a batch: on CPU in steps of CPU_STEP clips (unless compiled or at fixed
        shapes: whole batches), elsewhere at once."""
        if self.device.type != "cpu" or self.compiled or self.fixed_shapes or len(images) <= CPU_STEP:
            return self.score(images, frames)
        parts = [self.score(images[k:k + CPU_STEP], None if frames is None else frames[k:k + CPU_STEP])
                 for k in range(0, len(images), CPU_STEP)]
        return np.concatenate([p for p, _ in parts]), {key: np.concatenate([m[key] for _, m in parts])
                                                        for key in parts[0][1]}

    def __call__(self, clips: list[faces_mod.FaceClip]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.score_batch(np.stack([c.image for c in clips]), np.stack([c.frames for c in clips]))

    def replica(self, device: torch.device) -> "Runner":
        """The same model on another device (one per GPU)."""
        model = copy.deepcopy(self.model).to(device)
        return Runner(model, device, self.dtype, use_compile=self.compiled, batch_size=self.batch_size, say=self.say,
                      fixed_shapes=self.fixed_shapes if self.device.type == device.type else None)


def make_runner(model: LDADetector, device: torch.device, dtype: torch.dtype, backend: str = "torch", *,
                key: str = "", batch_size: int = 8, use_compile: bool = False, say=None):
    """The model runner of ``backend`` (``score_openvino.pick_backend``'s answer): a torch
    ``Runner``, or an ``OpenVinoRunner`` converted from the model (cached under ``key``, the
    checkpoint's sha256)."""
    if backend == "openvino":
        from .score_openvino import OpenVinoRunner

        if use_compile:
            raise ConfigError("--compile is torch.compile: it does not apply to --backend openvino")
        return OpenVinoRunner(model, dtype, key=key, batch_size=batch_size, say=say)
    return Runner(model, device, dtype, use_compile=use_compile, batch_size=batch_size, say=say)


def _pad(batch, size: int):
    if isinstance(batch, torch.Tensor):  # crops cut on the device
        return torch.cat([batch, batch.new_zeros((size - len(batch), *batch.shape[1:]))])
    return np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])


def compile_model(model: LDADetector, device: torch.device):
    """torch.compile for inference: fixed shapes; on CPU, inductor freezes the weights (constant
    folding, prepacked oneDNN convolutions). Compilation itself happens on the first call."""
    import logging

    import torch._inductor.config as inductor_config

    if device.type == "cpu":
        inductor_config.freezing = True
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" noise
    return torch.compile(model, dynamic=False)
