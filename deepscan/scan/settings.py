"""A scan's settings, and the one place that picks what a scan runs on: devices, precision,
preparation (workers or device), decoder (ffmpeg or NVDEC), batch size, workers and slots.
``choose`` resolves the ``auto`` choices of a request once; every stage then reads the
resolved ``ScanSettings`` (``on_device``) instead of deciding again.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from typing import TYPE_CHECKING

from ..config import ALIGNMENTS, CROP_MARGIN, MIN_FACE
from ..errors import ConfigError

if TYPE_CHECKING:  # the workers (and numpy) load when a pool starts: a scan --server client never does
    from .workers import PreparePool, PrepSettings

AGGREGATIONS = ("mean", "median", "max")
PREPARATIONS = ("workers", "device")
DEVICE_SLOTS = 6  # slots per worker handing over frames: a clip's frames are 8-19 MB (720p-1080p)
NVDEC_NEEDS_DEVICE = "--decoder nvdec needs --preparation device (NVDEC's frames stay on the GPU)"
ALIGNED_NEEDS_WORKERS = ("this checkpoint's faces are aligned on their landmarks, which only the preparation workers "
                         "do so far; use --preparation workers (or auto)")


@dataclass(frozen=True)
class ScanSettings:
    clips: int = 32  # K clips per video (SPEC §2)
    threshold: float = 0.5
    aggregation: str = "mean"  # frame -> track score; the paper uses the mean
    batch_size: int = 8
    min_face: int = MIN_FACE
    margin: float = CROP_MARGIN
    strategy: str = "auto"  # decoding: auto | select | seek
    hash_files: bool = True
    keep_crops: int = 4  # most suspicious face clips kept per video for heatmaps (0: none)
    timeout_s: float = 600.0  # an input whose preparation makes no progress this long is abandoned
    preparation: str = "workers"  # workers: they detect and crop; device: they decode, the model's device does the rest
    decoder: str = "ffmpeg"  # ffmpeg (in the workers) or nvdec (threads here, with preparation on the device)
    alignment: str = "none"  # the checkpoint's: "deepfakebench-5pt" aligns crops on the landmarks (faces.ALIGNMENTS)

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"--aggregate must be one of {', '.join(AGGREGATIONS)}")
        if self.clips < 1 or self.batch_size < 1:
            raise ConfigError("--clips and --batch-size must be >= 1")
        if self.min_face < 1:
            raise ConfigError(f"--min-face must be at least 1 pixel, not {self.min_face}")
        if not self.timeout_s > 0:  # (NaN too)
            raise ConfigError(f"--timeout must be a number of seconds > 0, not {self.timeout_s}")
        if self.decoder not in ("ffmpeg", "nvdec"):
            raise ConfigError(f"--decoder must be auto, ffmpeg or nvdec, not {self.decoder!r}")
        if self.decoder == "nvdec" and self.preparation != "device":
            raise ConfigError(NVDEC_NEEDS_DEVICE)
        if self.preparation not in PREPARATIONS:
            raise ConfigError(f"--preparation must be auto, {' or '.join(PREPARATIONS)}, not {self.preparation!r}")
        if self.alignment not in ALIGNMENTS:
            raise ConfigError(f"alignment must be one of {', '.join(ALIGNMENTS)}, not {self.alignment!r}")
        if self.alignment != "none" and self.preparation == "device":
            raise ConfigError(ALIGNED_NEEDS_WORKERS)

    def record(self) -> dict:
        """The settings every record carries besides threshold and aggregation (what --resume
        compares, with the checkpoint and the detector)."""
        return {"clips": self.clips, "min_face": self.min_face}

    @property
    def on_device(self) -> bool:
        """Whether the model's device detects and crops (the workers, or NVDEC, only decode)."""
        return self.preparation == "device"

    def prep(self, cfg, max_side: int | None = None) -> PrepSettings:
        from ..video import MAX_SIDE
        from .workers import PrepSettings

        return PrepSettings(clips=self.clips, clip_len=cfg.clip_len, image_size=cfg.image_size,
                            lda_size=cfg.lda_size, margin=self.margin, min_face=self.min_face,
                            strategy=self.strategy, hash_files=self.hash_files, max_side=max_side or MAX_SIDE,
                            handover="frames" if self.on_device else "crops",
                            alignment=self.alignment)


# ---------------------------------------------------------------------------- devices
def pick_device(name: str = "auto"):
    """The first device of ``pick_devices``, as a ``torch.device`` (for callers that run torch)."""
    import torch

    (dev,) = pick_devices(name)[:1]
    return torch.device(str(dev))


def pick_devices(name: str = "auto") -> list:
    """``auto``: every visible GPU, else the CPU; ``cuda``: every visible GPU; ``cpu``;
    ``cuda:N``; or a comma-separated list such as ``cuda:0,cuda:2``.

    The CPU alone is answered without importing torch when torch is not loaded yet and, for
    ``auto``, no NVIDIA driver node exists (``hardware.CPU``, which stages read as they read a
    ``torch.device``): a CPU scan on OpenVINO then never loads torch."""
    from ..hardware import CPU, nvidia_present

    name = name.strip()
    if "torch" not in sys.modules and (name == "cpu" or (name == "auto" and not nvidia_present())):
        return [CPU]
    import torch

    if name == "auto":
        return pick_devices("cuda") if torch.cuda.is_available() else [torch.device("cpu")]
    out = []
    for part in [p.strip() for p in name.split(",") if p.strip()] or [name]:
        if part != "cpu" and not (part == "cuda" or (part.startswith("cuda:") and part[5:].isdigit())):
            raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or a list like cuda:0,cuda:2, not {name!r}")
        if part.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
            count = torch.cuda.device_count()
            if part == "cuda":
                out += [torch.device("cuda", i) for i in range(count)]
                continue
            if int(part[5:]) >= count:
                raise ConfigError(f"--device {part}: torch sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
        out.append(torch.device(part))
    if len(set(out)) != len(out):
        raise ConfigError(f"--device {name!r} names a device twice")
    return out


# CPU flags of native bf16 arithmetic: AVX-512 BF16 or AMX (what torch.cpu's probes test)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "amx_tile"})


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU: from /proc/cpuinfo (no torch needed), else torch's probes."""
    from ..hardware import cpu_flags

    flags = cpu_flags()
    if flags is not None:
        return bool(flags & BF16_FLAGS)
    import torch

    probe_fn = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe_fn and probe_fn()) or (amx and amx()))


PRECISIONS = ("fp32", "bf16", "fp16")


def precision_name(name: str, device) -> str:
    """``--precision name`` on ``device`` as fp32, bf16 or fp16. auto: bf16 on CUDA (fp16 where a
    GPU has no bf16) and on CPUs with native bf16 (AVX-512 BF16 / AMX), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if name not in PRECISIONS:
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, not {name!r}")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 is for CUDA; on CPU use bf16 or fp32")
    return name


def pick_precision(name: str, device):
    """``precision_name`` as a torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision_name(name, device)]


def pick_decoder(name: str, preparation: str, device, say=None, module=None) -> str:
    """``auto``: NVDEC when the device prepares on a GPU and NVDEC works there (one check; one
    notice when it does not), else ffmpeg in the workers; ``nvdec`` must work or is refused."""
    if name not in ("auto", "ffmpeg", "nvdec"):
        raise ConfigError(f"--decoder must be auto, ffmpeg or nvdec, not {name!r}")
    if name == "ffmpeg" or (name == "auto" and (preparation != "device" or device.type != "cuda")):
        return "ffmpeg"
    if preparation != "device":
        raise ConfigError(NVDEC_NEEDS_DEVICE)
    from .nvdec import available

    why = available(device, module) if device.type == "cuda" or module is not None else "NVDEC needs a CUDA device"
    if why is None:
        return "nvdec"
    if name == "nvdec":
        raise ConfigError(f"--decoder nvdec: {why}; use --decoder ffmpeg")
    if say:
        say(f"note: decoding with ffmpeg: {why}")
    return "ffmpeg"


def pick_preparation(name: str, detector: str, alignment: str = "none") -> str:
    """``auto``: the workers, on every device, until a GPU run has measured device preparation
    (benchmarks/gpu.sh; on this project's CPUs the workers are faster: README 'Preparation on
    the device');
    ``device`` runs BlazeFace in torch, so it takes no other detector, and cuts square crops only
    (a checkpoint whose faces are aligned needs the workers)."""
    if name == "auto":
        return "workers"
    if name not in PREPARATIONS:
        raise ConfigError(f"--preparation must be auto, {' or '.join(PREPARATIONS)}, not {name!r}")
    if name == "device" and alignment != "none":
        raise ConfigError(ALIGNED_NEEDS_WORKERS)
    if name == "device" and detector != "blazeface":
        raise ConfigError(f"--preparation device runs BlazeFace on the model's device; it cannot run --detector "
                          f"{detector} (use --detector blazeface, or --preparation workers)")
    return name


def default_batch_size(device: str) -> int:
    """--batch-size when not given: 8 on CPU (clips/s hardly depends on it there), 64 on CUDA
    (on an H200 in bf16: 2,552 / 2,695 / 2,800 clips/s at 32 / 64 / 128, 2.5 GB at 64)."""
    return 64 if pick_devices(device)[0].type == "cuda" else 8


def default_workers(devices: list) -> int:
    """Preparation workers when --workers is not given: every core on a GPU machine; on CPU
    every core but one for the model (2 cores: 1 worker; see README 'Performance')."""
    from .workers import cpu_count

    cores = cpu_count()
    if any(d.type == "cuda" for d in devices):
        return cores
    return max(1, cores - 1)


def slots_for(settings: ScanSettings, workers: int, gpu: bool, devices: int = 1) -> int:
    """Slots per worker: enough in all for two batches per device; on CPU a deep buffer, so that
    a worker works ahead while the slower model catches up."""
    if settings.on_device:  # a slot holds a decoded clip, not a face clip
        return DEVICE_SLOTS
    per = -(-2 * settings.batch_size * devices // max(1, workers))
    return max(16, per) if gpu else max(64, per)


def start_pool(settings: ScanSettings, cfg, make_detector, workers: int, *, devices: int = 1, gpu: bool = False,
               slots_per_worker: int = 0, max_side: int | None = None) -> PreparePool:
    """Preparation workers for scans with ``settings`` and a model of config ``cfg``."""
    from .workers import PreparePool

    if not slots_per_worker:
        slots_per_worker = slots_for(settings, workers, gpu, devices)
    return PreparePool(workers, settings.prep(cfg, max_side), make_detector, slots_per_worker=slots_per_worker,
                       stall_s=settings.timeout_s)


def choose(settings: ScanSettings, *, detector: str, preparation: str, decoder: str, device, say=None) -> ScanSettings:
    """``settings`` with the preparation and the decoder resolved (``auto`` answered, a choice
    that cannot run refused): the one decision every stage then reads."""
    prep = pick_preparation(preparation, detector, settings.alignment)
    return dataclasses.replace(settings, preparation=prep, decoder=pick_decoder(decoder, prep, device, say=say))
