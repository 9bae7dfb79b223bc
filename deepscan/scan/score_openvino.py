"""The model on OpenVINO, for scans on a CPU (``--backend openvino``; ``auto`` picks it on CPU when
OpenVINO is installed).

The loaded checkpoint is converted once (``export_openvino``: the one part that needs torch) and
kept on disk in deepscan's cache folder under a
key of the checkpoint's sha256, OpenVINO's version and the input shapes (~90 MB: the weights in
fp32), so a second scan starts in a fraction of a second, without torch or the checkpoint's tensors
(the entry was made from the same checkpoint sha256, checked then) (compiling the IR for the precision takes
~0.15 s; OpenVINO's compiled-model cache would add 93 MB per precision for nothing). Precision:
``--precision`` becomes OpenVINO's inference precision hint (bf16 where the CPU has it).

Cores: one compiled model with as many streams as the scan has CPU model lanes and each lane
thread holding its own infer request, so the lanes run side by side as the torch lanes do
(measured against OpenVINO's THROUGHPUT hint with an async queue: the same clips/s).

Telemetry: OpenVINO's converter sends usage events through the ``openvino_telemetry`` package
unless a consent file says no. deepscan keeps that package out of its process (a ``None`` entry
in ``sys.modules`` before OpenVINO is imported), so OpenVINO falls back to its built-in stub and
nothing is sent, whatever the consent file says.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError, io_reason

EXPORT_VERSION = 1  # in the cache key: a change to the export makes a new entry
BACKENDS = ("auto", "torch", "openvino")
INSTALL_HINT = "pip install openvino (or pip install 'deepscan[openvino]')"
# --precision (or a torch dtype's name) -> OpenVINO's inference precision hint
_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def import_openvino():
    """The ``openvino`` module, its telemetry kept out (see the module docstring)."""
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # importing it now raises ImportError: OpenVINO uses its stub
    try:
        import openvino
    except ImportError:
        raise ConfigError(f"--backend openvino: OpenVINO is not installed; {INSTALL_HINT}") from None
    return openvino


def installed() -> bool:
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a module entry of None (blocked), or a broken install
        return False


def pick_backend(name: str, device) -> str:
    """``torch`` or ``openvino`` for ``--backend name`` on ``device``."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose {', '.join(BACKENDS)}")
    if name == "auto":
        return "openvino" if device.type == "cpu" and installed() else "torch"
    if name == "openvino":
        if device.type != "cpu":
            raise ConfigError(f"--backend openvino runs on the CPU, not {device}; pass --device cpu, or --backend "
                              "torch on a GPU")
        import_openvino()
    return name


def cache_root() -> Path:
    from ..errors import cache_home

    return cache_home() / "openvino"


def _shapes(cfg) -> dict:
    shapes = {"image": [1, cfg.image_size, cfg.image_size, 3]}
    if cfg.variant != "xception":
        shapes["frames"] = [1, cfg.clip_len, cfg.lda_size, cfg.lda_size, 3]
    return shapes


def _convert(model, cfg, folder: Path, ov, say: Callable[[str], None] | None = None):
    """Convert ``model`` (``export_openvino``); keep it in ``folder`` (model.xml/.bin and
    meta.json, written whole or not at all). Returns (meta, what to compile: the kept model.xml, or
    the converted model itself when the cache cannot take it, e.g. a full disk: the scan goes on
    and converts again next time)."""
    from .export_openvino import convert

    shapes = _shapes(cfg)
    converted, names = convert(model, shapes, ov)
    meta = {"maps": names, "shapes": shapes, "openvino": ov.__version__, "variant": cfg.variant}
    try:
        _keep(converted, meta, folder, ov)
    except (OSError, RuntimeError) as exc:  # OpenVINO's writer fails as RuntimeError("basic_ios::clear ...")
        why = io_reason(exc, folder.parent)
        if say:
            say(f"note: cannot keep the converted model in {folder.parent} ({why}); using it from memory, "
                "converting again next time (set XDG_CACHE_HOME to a folder with ~100 MB free)")
        return meta, converted
    return meta, str(folder / "model.xml")


IR_FILES = ("model.xml", "model.bin")


def _fingerprint(folder: Path) -> dict:
    """Size and sha256 of each IR file: what identifies an entry's content (its folder name only
    says what it was made from). Hashing ~90 MB takes ~0.1 s, compiling takes more."""
    from ..hashing import sha256_file

    return {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in IR_FILES}


def valid_meta(folder: Path) -> dict | None:
    """The entry's meta.json when it is whole and its IR files are the ones it recorded; None
    for a missing, damaged or foreign entry (made again by the caller)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if not (isinstance(meta, dict) and isinstance(meta.get("maps"), list)
                and all(isinstance(m, str) for m in meta["maps"]) and isinstance(meta.get("files"), dict)):
            return None
        return meta if meta["files"] == _fingerprint(folder) else None
    except (OSError, ValueError, RecursionError):
        return None


def _keep(converted, meta: dict, folder: Path, ov) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
    try:
        ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)
        meta["files"] = _fingerprint(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta))
        for attempt in (0, 1):
            try:
                os.replace(tmp, folder)
                break
            except OSError:
                if valid_meta(folder) is not None:  # another scan made it meanwhile: use theirs
                    break
                if attempt:
                    raise
                shutil.rmtree(folder, ignore_errors=True)  # a broken entry (no meta.json, damaged): replaced once
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(load_model: Callable, cfg, folder: Path, ov, settings: dict, meta: dict | None, say=None):
    """(map names, compiled model) from the cache entry ``folder`` whose checked ``meta`` is
    given, or, with ``meta`` None, after converting the model (``load_model()``) into it. No
    CACHE_DIR: compiling the IR takes ~0.15 s, its blob would be 93 MB more per precision."""
    if meta is None:
        meta, source = _convert(load_model(), cfg, folder, ov, say)
    else:
        source = str(folder / "model.xml")
    return list(meta["maps"]), ov.Core().compile_model(source, "CPU", settings)


def _precision(precision) -> str:
    """OpenVINO's precision hint for ``--precision`` (fp32, bf16) or a torch dtype."""
    name = str(precision).removeprefix("torch.")
    hint = _PRECISION.get(name)
    if hint is None:
        raise ConfigError(f"--backend openvino: no {name} on the CPU; use --precision fp32 or bf16")
    return hint


def _threads() -> int:
    """The threads a CPU model uses: torch's count where torch is loaded (as the torch runner
    reads it), else every core this process may use."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    from .workers import cpu_count

    return cpu_count()


class OpenVinoRunner:
    """The interface of ``scan.Runner`` (``score``, ``score_batch``, ``__call__``, ``cfg``,
    ``device``, ``threads``) on an OpenVINO model compiled for this CPU."""

    backend = "openvino"
    compiled = False  # torch.compile: not here

    def __init__(self, model, precision, *, key: str, cfg=None, batch_size: int = 8,
                 threads: int | None = None, lanes: int | None = None, say: Callable[[str], None] | None = None):
        """``model``: the loaded model, or a function that loads it, called only when the cache
        has no whole entry for ``key`` (then ``cfg`` is the model's config); ``precision``:
        fp32 or bf16 (or a torch dtype); ``key``: the checkpoint's sha256."""
        from ..hardware import CPU
        from .lanes import cpu_lanes

        ov = import_openvino()
        if hasattr(model, "config"):
            loaded = model
            cfg = model.config
            model = lambda: loaded  # noqa: E731
        if cfg is None:
            raise TypeError("OpenVinoRunner: pass cfg= with a model loader")
        self.cfg = cfg
        self.device, self.batch_size, self.say = CPU, batch_size, say
        self.threads = threads or _threads()
        self.lanes = lanes or len(cpu_lanes(self.threads))
        precision = _precision(precision)
        shapes = _shapes(self.cfg)
        digest = hashlib.sha256(json.dumps([key, ov.__version__, shapes, EXPORT_VERSION]).encode()).hexdigest()
        folder = cache_root() / f"{self.cfg.variant}-{digest[:24]}"
        t = time.perf_counter()
        meta = valid_meta(folder)
        if meta is None and folder.exists():
            if say:
                say(f"note: the OpenVINO cache entry {folder} is damaged or not what it recorded (a file changed, "
                    "missing or replaced); converting the model again")
            shutil.rmtree(folder, ignore_errors=True)
        elif meta is None and say:
            say(f"converting the model for OpenVINO (once per checkpoint, kept in {folder.parent})")
        self.precision, self._cold, self._failure = precision, meta is None, None
        settings = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": self.threads,
                    "NUM_STREAMS": self.lanes, "PERFORMANCE_HINT": "THROUGHPUT"}
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        start = functools.partial(self._start, model, folder, ov, settings, meta, t)
        if meta is None:  # converting: here, so that a checkpoint that cannot load fails the scan now
            start()
            self.ready()
        else:  # compiling and warming the cached IR (~0.6 s on 2 cores) overlaps the workers' first clips
            threading.Thread(target=start, name="deepscan-openvino-start", daemon=True).start()

    def _start(self, load_model, folder: Path, ov, settings: dict, meta: dict | None, t: float) -> None:
        try:
            try:
                self.map_names, self.compiled_model = _load(load_model, self.cfg, folder, ov, settings, meta, self.say)
            except (ValueError, KeyError, RuntimeError, OSError):  # a damaged or unreadable cache entry: made again
                if meta is None:
                    raise
                shutil.rmtree(folder, ignore_errors=True)
                self._cold = True
                self.map_names, self.compiled_model = _load(load_model, self.cfg, folder, ov, settings, None, self.say)
            # One infer request per lane, each warmed here, one after the other: requests that
            # make their first inference at the same time (two lanes starting together)
            # deadlocked (OpenVINO 2026.4, 2 cores: both threads waiting in the first input copy,
            # found in a resumed scan), as reported for other programs on few cores
            # (ultralytics#25923).
            zeros = [np.zeros(shape, np.uint8) for shape in _shapes(self.cfg).values()]
            for _ in range(self.lanes):
                req = self.compiled_model.create_infer_request()
                req.infer(zeros)
                self._pool.put(req)
            self.start_s = round(time.perf_counter() - t, 2)
        except BaseException as exc:  # noqa: BLE001 - raised where the runner is used (ready, score)
            self._failure = exc
        finally:
            self._ready.set()

    def ready(self, timeout: float | None = None) -> bool:
        """Wait until the model is compiled and its requests warmed (a start from the cache runs
        in a thread of its own); its failure, if it failed, is raised here."""
        done = self._ready.wait(timeout)
        if self._failure is not None:
            raise self._failure
        return done

    def settle(self, timeout: float = 60.0) -> None:
        """Wait for the start thread to end, whatever its outcome (before the process leaves: a
        compile cut short by the interpreter's exit could abort in OpenVINO's destructors)."""
        self._ready.wait(timeout)

    @property
    def cold(self) -> bool:
        """True when this start converted the model (the cache had no whole entry for it)."""
        self._ready.wait()
        return self._cold

    def score(self, images: np.ndarray, frames: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """uint8 crops, images (B, S, S, 3) and frames (B, n, s, s, 3) -> P(fake) (B,) and maps,
        one clip per inference (the graph's batch is 1, as the CPU lanes score)."""
        self.ready()
        req = self._pool.get()  # a lane's own request while it scores; never two threads on one
        try:
            return self._score(req, images, frames)
        finally:
            self._pool.put(req)

    def _score(self, req, images: np.ndarray, frames: np.ndarray | None):
        probs, maps = [], {k: [] for k in self.map_names}
        temporal = self.cfg.variant != "xception"
        for i in range(len(images)):
            inputs = [np.ascontiguousarray(images[i:i + 1])]
            if temporal:
                inputs.append(np.ascontiguousarray(frames[i:i + 1]))
            out = req.infer(inputs)
            values = [out[o] for o in self.compiled_model.outputs]
            probs.append(values[0])
            for k, v in zip(self.map_names, values[1:]):
                maps[k].append(np.asarray(v, np.float32))
        return (np.concatenate(probs).astype(np.float32),
                {k: np.concatenate(v) for k, v in maps.items()})

    score_batch = score

    def __call__(self, clips) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.score(np.stack([c.image for c in clips]), np.stack([c.frames for c in clips]))

    def replica(self, device):
        raise ConfigError(f"--backend openvino runs on the CPU, not {device}")
