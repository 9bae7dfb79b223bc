"""Detector specs for tests that need a worker process to misbehave (picklable by reference, and
light: no torch import in the worker). Frames of POISON_SIZE trigger the misbehaviour."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

POISON_SIZE = (120, 200)  # (height, width) of the poison video's frames; no other test video has it


@dataclass(frozen=True)
class PoisonSpec:
    """dlib's detector, except on poison frames: "kill" SIGKILLs its process, "hang" sleeps,
    "kill-once" SIGKILLs its process the first time only (``marker`` is the file that remembers)."""

    action: str
    marker: str | None = None
    name: str = "dlib"

    def build(self):
        return _Poison(self.action, self.marker)


class _Poison:
    name = "dlib"

    def __init__(self, action: str, marker: str | None):
        from deepscan.faces import DlibDetector

        self.action, self.marker, self.dlib = action, marker, DlibDetector()

    def __call__(self, frame, hints=(), **kw):
        if frame.shape[:2] == POISON_SIZE:
            if self.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.action == "kill-once":
                if not os.path.exists(self.marker):
                    open(self.marker, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
            else:
                time.sleep(3600)
        return self.dlib(frame, hints, **kw)
