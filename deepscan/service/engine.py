"""The service's scan: one ``Scanner`` run that lasts as long as the service, fed by every
request. Records leave the pipeline in the order inputs were taken from the feed (the pipeline's
rule: one record per input, in input order), so the engine routes each record to its request by
that order alone.

Owners: the ``Feed`` owns the inputs not yet taken (per request, served round-robin, so one
large request does not hold back a small one queued after it); the engine owns the order of the
inputs taken and each request's count of records still due; a ``Request`` owns its delivery."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..scan.plan import ScanInput


@dataclass(eq=False)
class Request:
    """One client's inputs. ``deliver(record)`` is called from the scanning thread for each of
    its records, then ``deliver(None)`` once all are in (or it was cancelled)."""

    inputs: list[ScanInput]
    deliver: Callable[[dict | None], None]
    due: int = 0  # records still to come
    cancelled: bool = False
    on_done: Callable[[], None] | None = None  # (after the last record: a temporary upload deleted)
    _finished: bool = field(default=False, repr=False)

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            if self.on_done is not None:
                self.on_done()
            self.deliver(None)


class Feed:
    """The inputs of every open request not yet taken by the scanner, one from each request in
    turn. Iterating yields the next input, ``None`` when none waits (the scanner asks again), and
    stops once closed and empty."""

    def __init__(self, wake: Callable[[], None]):
        self._lock = threading.Lock()
        self._queues: collections.OrderedDict[Request, collections.deque] = collections.OrderedDict()
        self._closed = False
        self._wake = wake
        self.taken: collections.deque[tuple[Request, ScanInput]] = collections.deque()  # each input taken, in order

    def add(self, req: Request) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the service is stopping")
            if req.inputs:
                self._queues[req] = collections.deque(req.inputs)
        self._wake()

    def withdraw(self, req: Request) -> int:
        """Inputs of ``req`` not taken yet are removed; returns how many."""
        with self._lock:
            left = self._queues.pop(req, None)
        return len(left) if left else 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake()

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def __iter__(self):
        return self

    def __next__(self) -> ScanInput | None:
        with self._lock:
            if not self._queues:
                if self._closed:
                    raise StopIteration
                return None
            req, queue = next(iter(self._queues.items()))
            inp = queue.popleft()
            if queue:
                self._queues.move_to_end(req)  # round-robin: the next request's turn
            else:
                del self._queues[req]
            self.taken.append((req, inp))
            return inp


class Engine:
    """The local scan set up once (``run.Local``) and one scanner run in a thread of its own,
    restarted should a run fail (the inputs it held get error records, the service goes on)."""

    def __init__(self, local, say: Callable[[str], None]):
        self.local, self.say = local, say
        self.scanner = local.scanner(say)
        self.feed = Feed(self.scanner.wake)
        self._lock = threading.Lock()
        self.open: set[Request] = set()
        self.scanned = 0
        self._thread = threading.Thread(target=self._serve, name="deepscan-service-scan", daemon=True)
        self._thread.start()

    # ---- requests (any thread)
    def submit(self, inputs: list[ScanInput], deliver, on_done=None) -> Request:
        req = Request(list(inputs), deliver, due=len(inputs), on_done=on_done)
        with self._lock:
            self.open.add(req)
        if not inputs:
            self._finish(req)
            return req
        self.feed.add(req)
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: its inputs not started are withdrawn; those in the pipeline run
        to their end (at most the scanner's window) and their records are dropped."""
        with self._lock:
            req.cancelled = True
            req.due -= self.feed.withdraw(req)
            done = req.due <= 0
        if done:
            self._finish(req)

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self.open)

    # ---- the scanning thread
    def _serve(self) -> None:
        from ..errors import DeepscanError

        while True:
            try:
                self.scanner.run(self.feed, self._on_record)
                return  # the feed closed and everything taken is recorded
            except Exception as exc:  # noqa: BLE001 - a failed run (the model): its inputs get errors, a new run starts
                why = str(exc) if isinstance(exc, DeepscanError) else f"{type(exc).__name__}: {exc}"
                self.say(f"deepscan serve: a scan run failed ({why}); its inputs get error records")
                self._fail_taken(why)

    def _on_record(self, record: dict, row) -> None:
        with self._lock:
            req = self._owner(record["path"])
            req.due -= 1
            self.scanned += 1
            done = req.due <= 0
        if not req.cancelled:
            req.deliver(record)
        if done:
            self._finish(req)

    def _owner(self, path: str) -> Request:
        """The request of a record: the first input taken (records leave in that order; after a
        failed run the complete ones are flushed past incomplete ones, hence the path check)."""
        taken = self.feed.taken
        for k, (req, inp) in enumerate(taken):
            if inp.path == path:
                del taken[k]
                return req
        raise RuntimeError(f"a record for {path!r}, which no request holds")  # the pipeline's rule broken

    def _fail_taken(self, why: str) -> None:
        from ..scan.assemble import error_record

        while True:
            with self._lock:
                if not self.feed.taken:
                    return
                req, inp = self.feed.taken.popleft()
                req.due -= 1
                done = req.due <= 0
            if not req.cancelled:
                req.deliver(error_record(inp.path, f"the service's scan failed before this input was done ({why}); "
                                              "scan it again", settings=self.local.req.settings,
                                         model=self.local.model_rec, detector=self.local.spec.name))
            if done:
                self._finish(req)

    def _finish(self, req: Request) -> None:
        with self._lock:
            self.open.discard(req)
        req.finish()

    def close(self, timeout: float = 30.0) -> None:
        """No new inputs; what was taken finishes (the drain), then workers and lanes stop."""
        self.feed.close()
        self._thread.join(timeout)
        self.scanner.close()
        self.local.close()
