"""The batcher: face clips wait here, in arrival order, until they leave as a model batch. Pure
(no processes, no threads, no clocks of its own): the scanner tells it the time, whether a lane
is idle and whether more clips can come, so it is tested without any of them.
"""

from __future__ import annotations

from typing import NamedTuple

from .events import ClipMeta, Handle

# A part-filled batch leaves once its oldest clip has waited this long (or at once when a model
# lane is idle, or when no more clips can come): a dynamic batcher's deadline, which needs no
# knowledge of how the clips are produced.
BATCH_WAIT_S = 0.25
MAX_WAIT_S = 0.2  # the longest the scanner sleeps before it looks again


class Pending(NamedTuple):
    """A face clip waiting for a batch."""

    index: int  # the input's
    slot: Handle | None  # where its pixels are (None: ``pixels`` holds them, cut on the device)
    meta: ClipMeta
    arrival: float  # time.monotonic() when it arrived: the deadline counts from the oldest
    pixels: object = None  # (image, frames) tensors cut on the device


class Batcher:
    """Pending clips (the one owner of them) and the rule for when a batch leaves."""

    def __init__(self, size: int, wait_s: float = BATCH_WAIT_S):
        self.size, self.wait_s = size, wait_s
        self._pending: list[Pending] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, clip: Pending) -> None:
        self._pending.append(clip)

    def take(self, now: float, lane_idle: bool, more_coming: bool) -> list[Pending] | None:
        """The next batch, or None: a full one; a part-filled one when a lane is idle, when its
        oldest clip has waited ``wait_s``, or when no more clips can come."""
        if not self._pending:
            return None
        if len(self._pending) < self.size:
            waited = now - self._pending[0].arrival
            if not (lane_idle or waited >= self.wait_s or not more_coming):
                return None
        chunk, self._pending = self._pending[:self.size], self._pending[self.size:]
        return chunk

    def due(self, now: float) -> float:
        """How long the scanner may sleep before a part-filled batch is due."""
        if not self._pending:
            return MAX_WAIT_S
        return min(MAX_WAIT_S, max(0.0, self.wait_s - (now - self._pending[0].arrival)))

    def drop(self, index: int | None = None) -> list[Pending]:
        """Remove and return the clips of input ``index`` (None: all of them)."""
        if index is None:
            out, self._pending = self._pending, []
            return out
        out = [p for p in self._pending if p.index == index]
        if out:
            self._pending = [p for p in self._pending if p.index != index]
        return out
