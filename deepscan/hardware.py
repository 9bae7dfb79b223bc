"""What this machine has, answered without importing torch (a CUDA build of torch takes ~1.4 s
to import; a CPU-only scan should not pay it to learn there is no GPU)."""

from __future__ import annotations

import functools
import os

# Nodes an NVIDIA driver makes (Linux; /dev/dxg: WSL2). With none of them no CUDA device can exist.
NVIDIA_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/dxg")


def nvidia_present() -> bool:
    """True when an NVIDIA driver may be loaded here (torch then says whether CUDA works)."""
    return any(os.path.exists(p) for p in NVIDIA_NODES)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where that cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


class CpuDevice:
    """``torch.device("cpu")`` for a process that has not imported torch: what the scan's stages
    read of a device (``type``, ``index``, ``str``). Torch code converts it with
    ``torch.device(str(dev))``."""

    type = "cpu"
    index = None

    def __str__(self) -> str:
        return "cpu"

    def __repr__(self) -> str:
        return "device(type='cpu')"

    def __eq__(self, other) -> bool:
        return str(other) == "cpu"

    def __hash__(self) -> int:
        return hash("cpu")


CPU = CpuDevice()
