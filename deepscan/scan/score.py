"""The model's runners: face clips in, P(fake) and attention maps out, in batches. ``Runner``
is torch's (eager or torch.compile); ``score_openvino.OpenVinoRunner`` has the same interface
(``score_batch``, ``cfg``, ``device``, ``threads``, ``replica``), and ``make_runner`` picks one.
The threads that drive them are the lanes (``lanes``).
"""

from __future__ import annotations

import copy
import threading
from typing import Callable, Protocol

import numpy as np
import torch

from .. import faces as faces_mod
from ..errors import ConfigError
from ..model import LDADetector, fold_batchnorm, input_normaliser

# A CPU lane scores its batch one clip at a time: as fast as larger steps on one thread (model
# alone, 2 lanes, clips/s at steps of 1/2/4/8: 4.83-5.25 / 4.73-4.99 / 4.68-4.79 / 4.53-4.55), and
# the activations of two lanes peak at +250 MB instead of +457 MB (steps of 2) or +1336 MB (8).
CPU_STEP = 1


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
    ``say`` and carries on uncompiled."""

    backend = "torch"

    def __init__(self, model: LDADetector, device: torch.device, dtype: torch.dtype, *,
                 use_compile: bool = False, batch_size: int = 8, say: Callable[[str], None] | None = None):
        self.cfg = model.config
        device = torch.device(str(device))  # also hardware.CPU, the stand-in of a process without torch
        self.device, self.dtype = device, dtype
        # The runner owns the model: batch norms are folded into their convolutions in place.
        self.model = fold_batchnorm(model.to(device))
        if device.type == "cpu" or dtype != torch.float32:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._to_input = input_normaliser(self.cfg, device)
        self.batch_size, self.say = batch_size, say
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
        if self.cfg.variant == "xception":
            frames = None
        n = len(images)
        if self.compiled and n < self.batch_size:  # one shape for the compiled graph
            images = _pad(images, self.batch_size)
            frames = None if frames is None else _pad(frames, self.batch_size)
        autocast = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            logits, maps = self.forward(self._to_input(images), None if frames is None else self._to_input(frames))
        probs = torch.softmax(logits[:n].float(), dim=1)[:, 1].cpu().numpy()
        return probs, {k: v[:n].float().cpu().numpy() for k, v in maps.items()}

    def score_batch(self, images: np.ndarray, frames: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``score`` over a batch: on CPU in steps of CPU_STEP clips (unless compiled: one graph,
        whole batches), elsewhere at once."""
        if self.device.type != "cpu" or self.compiled or len(images) <= CPU_STEP:
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
        return Runner(model, device, self.dtype, use_compile=self.compiled, batch_size=self.batch_size, say=self.say)


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
