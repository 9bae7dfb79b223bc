"""The scanner: the stages wired together, and the one loop that moves events between them.

    plan (inputs) -> source (workers.PreparePool, nvdec.NvdecPool in front of it) -> device stage
    (device.DeviceStage, with --preparation device) -> batcher -> lanes (model runners) ->
    assembler (records, in input order) -> the caller's ``on_record`` (sink)

Owners (docs/pipeline.md): the source owns slots, tokens, jobs and stall timers; the device
stage its decoded clips and trackers; the batcher the pending clips; the lanes the batches in
flight; the assembler per-video state and output order; a ``_Run`` its id, and it resets all of
them when it ends. Memory depends on the number of workers, slots and the batch size, never on
the number of inputs. Any failure of one input becomes that input's ``error`` record.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ConfigError, DeepscanError
from .assemble import Assembler, Row
from .batcher import MAX_WAIT_S, Batcher, Pending
from .events import Clip, ClipMeta, Done, Frames, Lost, Started, Tail, Waker
from .lanes import Batch, Lanes
from .plan import ScanInput
from .settings import ScanSettings, start_pool


class Scanner:
    """The local pipeline: ``workers`` preparation processes (0: one thread), one lane per
    runner (device; several on CPU), assembly. Reusable: ``run`` may be called several times (a
    Ray actor does). ``make_detector``: a picklable zero-argument callable returning a face
    detector (``faces.DetectorSpec.build``); ``detector_name`` goes into every record. With
    ``heatmaps``, each video's PNGs are written before its record is emitted. ``pool``: workers
    started earlier with ``settings.start_pool`` (the CLI starts them while the model loads)."""

    def __init__(self, runners: list, make_detector, detector_name: str, settings: ScanSettings, *,
                 workers: int = 0, model: dict | None = None, heatmaps: Path | None = None,
                 slots_per_worker: int = 0, say: Callable[[str], None] | None = None, max_side: int | None = None,
                 pool=None, nvdec_module=None):
        if not runners:
            raise ConfigError("no device to score on")
        self.runners, self.settings, self.say = runners, settings, say
        self.detector_name, self.model, self.heatmaps = detector_name, model or {}, heatmaps
        cfg = runners[0].cfg
        gpu = any(r.device.type == "cuda" for r in runners)
        self.pool = pool or start_pool(settings, cfg, make_detector, workers, devices=len(runners), gpu=gpu,
                                       slots_per_worker=slots_per_worker, max_side=max_side)
        self.window = max(16, 4 * len(self.pool.workers))  # inputs in flight beyond the next to emit
        # With --preparation device each runner's device prepares the videos it scores (a "home":
        # a preparer, its stream, its batcher and its lanes); otherwise one home takes every batch.
        self.device_preps, self._pinned, self.prep_streams = [], None, []
        if settings.on_device:
            from .device import DETECT_FRAMES, DevicePreparer, pin_slots

            self.device_preps = [DevicePreparer(r.device, image_size=cfg.image_size, lda_size=cfg.lda_size,
                                                margin=settings.margin, min_face=settings.min_face) for r in runners]
            self._pinned = pin_slots(self.pool) if gpu else None
            if gpu:
                import torch

                # streams of their own: copies in, detection and crops overlap the lanes' batches
                self.prep_streams = [torch.cuda.Stream(p.device) if p.device.type == "cuda" else None
                                     for p in self.device_preps]
                # a detection step wants many whole frames at once: as many videos in flight
                self.window = max(self.window, 2 * DETECT_FRAMES * len(runners))
        if settings.decoder == "nvdec":
            from .nvdec import NvdecPool

            self.pool = NvdecPool(self.pool, settings.prep(cfg, max_side), runners[0].device, module=nvdec_module,
                                  say=say, stall_s=settings.timeout_s)
        self._waker = Waker()
        self.lanes = Lanes(runners, self._waker, homes=bool(self.device_preps))
        self._closed = False

    @property
    def device_prep(self):
        """The first home's preparer (None without --preparation device)."""
        return self.device_preps[0] if self.device_preps else None

    def wake(self) -> None:
        """Wake the scanning thread from its wait (a feed that has new inputs; any thread)."""
        self._waker()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop workers and lanes; True if every thread ended (a batch in progress is waited for)."""
        if self._closed:
            return True
        self._closed = True
        if self._pinned is not None:
            self._pinned()  # unpinned before the slots are unmapped
        self.pool.close()
        ended = self.lanes.close(timeout)
        self._waker.close()
        return ended

    def __enter__(self) -> "Scanner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, inputs: Iterable[ScanInput], on_record: Callable[[dict, Row], None]) -> Counter:
        """Scan ``inputs`` (any iterable, consumed lazily), calling ``on_record(record, row)``
        for each in input order. An iterable that yields ``None`` has nothing now but more to
        come (a service's feed): it is asked again after the next event or ``wake()``. Returns the count of each verdict. On KeyboardInterrupt (or any
        exception) the records already complete are still emitted, in order, before it propagates;
        nothing of a run that failed reaches the next one."""
        with _Run(self, inputs, on_record) as run:
            try:
                run.loop()
            finally:
                for record, row in run.assembler.flush():
                    on_record(record, row)
        return run.assembler.verdicts


class _Run:
    """One run of a Scanner: the owner of its id (stamped on every job and batch) and of the
    stages' state for it, which it resets when it ends, normally or not: the slots of its pending
    clips, its jobs in the workers (cancelled), its batches not yet started. Results of its
    batches being scored carry its id, and the next run drops them."""

    def __init__(self, scanner: Scanner, inputs: Iterable[ScanInput], on_record):
        self.sc, self.source, self.lanes = scanner, scanner.pool, scanner.lanes
        self.inputs, self.on_record = iter(inputs), on_record
        self.exhausted, self.next_index, self.id = False, 0, 0
        self.stages: list = []
        if scanner.device_preps:  # torch's stage: imported only for --preparation device
            from .device import DeviceStage

            self.stages = [DeviceStage(p, self.source) for p in scanner.device_preps]
        self.batchers = [Batcher(scanner.settings.batch_size) for _ in self.stages or [None]]
        self.assembler = Assembler(scanner.settings, model=scanner.model, detector=scanner.detector_name,
                                   heatmaps=scanner.heatmaps, on_device=bool(self.stages),
                                   on_complete=self.forget if self.stages else None)

    def home(self, index: int) -> int:
        """Which home (device) prepares and scores input ``index``: in turn."""
        return index % len(self.batchers)

    def forget(self, index: int) -> None:
        self.stages[self.home(index)].forget(index)

    def on_stream(self, home: int):
        """The context of a home's device work in this thread: its preparation stream, if any."""
        import contextlib

        streams = self.sc.prep_streams
        if not streams or streams[home] is None:
            return contextlib.nullcontext()
        import torch

        return torch.cuda.stream(streams[home])

    def __enter__(self) -> "_Run":
        self.id = self.source.begin_run()
        return self

    def __exit__(self, *exc) -> None:
        try:
            for batcher in self.batchers:
                self.source.free([p.slot for p in batcher.drop() if p.slot is not None])
            for stage in self.stages:
                stage.reset()
            self.source.end_run(self.id)
        finally:
            self.lanes.drop_waiting()

    def loop(self) -> None:
        waker, asm = self.sc._waker, self.assembler
        for home, stage in enumerate(self.stages):
            if stage.prep.device.type == "cuda":
                with self.on_stream(home):
                    stage.prep.warm()  # every detector shape, in this thread, before the first step
        while self.turn(waker, asm):
            pass

    def turn(self, waker, asm) -> bool:
        """One turn of the loop: inputs out, device steps, batches, events, results, records;
        False once every input's record is out."""
        self.dispatch()
        if self.exhausted and asm.idle:
            return False
        for home, stage in enumerate(self.stages):
            stage.release()  # slots whose copies to the device are over go back
            if stage:
                with self.on_stream(home):
                    for index, face_clips, seconds in stage.step():
                        self.prepared(index, face_clips, seconds)
        wait = self.form_batches()
        stepping = any(self.stages)
        holding = any(stage.holding for stage in self.stages)
        timeout = 0.0 if stepping else 0.002 if holding else wait if asm.videos else 0.5
        events, woke = self.source.poll(timeout, extra=[waker])
        if woke:
            waker.clear()
        for ev in events:
            self.on_event(ev)
        for res in self.lanes.results():
            if res.batch.run == self.id:  # an ended run's batch: its inputs are gone
                if res.failure is not None:
                    exc = res.failure
                    raise DeepscanError(f"the model failed on {len(res.batch.entries)} face clip(s) "
                                        f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from exc
                asm.scored(res.batch.entries, res.probs, res.maps, res.seconds, res.batch.frames)
        for record, row in asm.take():
            self.on_record(record, row)
        return True

    def dispatch(self) -> None:
        """Send inputs to the source while it has room and the window allows."""
        while not self.exhausted and self.source.capacity() > 0 and \
                self.next_index < self.assembler.emitted + self.sc.window:
            try:
                inp = next(self.inputs)
            except StopIteration:
                self.exhausted = True
                return
            if inp is None:  # a feed with nothing waiting now (a service between requests): not the end
                return
            index, self.next_index = self.next_index, self.next_index + 1
            self.assembler.open(index, inp.path, inp.error)
            if not inp.error:
                self.source.submit(index, inp.path)

    def on_event(self, ev) -> None:
        index, asm = ev.job.index, self.assembler
        if index not in asm.videos:  # (its record is made: what still comes of it goes back)
            if isinstance(ev, (Clip, Frames)) and ev.slot is not None:
                self.source.free([ev.slot])
            return
        if isinstance(ev, Started):
            asm.started(index, ev.head)
        elif isinstance(ev, Clip):
            asm.expect(index)
            self.batchers[0].add(Pending(index, ev.slot, ev.meta, time.monotonic(), ev.pixels))
        elif isinstance(ev, Frames):  # a decoded clip for the device: counted as one clip until then
            asm.expect(index)
            self.stages[self.home(index)].add(ev)
        elif isinstance(ev, (Done, Lost)):
            tail, error = (ev.tail, None) if isinstance(ev, Done) else (Tail(), ev.reason)
            if error or tail.error:
                self.drop(index)
            asm.ended(index, tail, error)

    def drop(self, index: int) -> None:
        """A failed video's clips still waiting go back, uncounted."""
        gone = self.batchers[self.home(index)].drop(index)
        self.source.free([p.slot for p in gone if p.slot is not None])
        count = len(gone) + (self.stages[self.home(index)].drop(index) if self.stages else 0)
        if count:
            self.assembler.dropped(index, count)

    def prepared(self, index: int, face_clips: list, seconds: float) -> None:
        """A decoded clip's face clips, cut on the device, join the pending ones with their pixels."""
        now = time.monotonic()
        for fc in face_clips:
            meta = ClipMeta(fc.track_id, fc.clip_index, fc.frame_index, fc.time_s, fc.box, fc.det_score)
            self.batchers[self.home(index)].add(Pending(index, None, meta, now, (fc.image, fc.frames)))
        self.assembler.prepared(index, len(face_clips), seconds)

    def form_batches(self) -> float:
        """Send batches to the lanes, each home's to its own (``Batcher.take`` decides when);
        returns how long the loop may wait before the next part-filled batch is due."""
        more = any(self.stages) or self.source.outstanding(self.id) > 0
        wait = MAX_WAIT_S
        for home, batcher in enumerate(self.batchers):
            while not self.lanes.full(home):
                chunk = batcher.take(time.monotonic(), self.lanes.idle(home), more)
                if chunk is None:
                    wait = min(wait, batcher.due(time.monotonic()))
                    break
                with self.on_stream(home):
                    images, frames = self.pixels(chunk)
                    ready = self.ready(images, home)
                self.lanes.put(Batch([(p.index, p.meta) for p in chunk], images, frames, self.id, ready), home)
        return wait

    def ready(self, images, home: int = 0):
        """For crops cut on a GPU, an event on the home's preparation stream after which they are
        whole (the lane's stream waits for it); None otherwise."""
        streams = self.sc.prep_streams
        if not streams or streams[home] is None or getattr(images, "device", None) is None \
                or images.device.type != "cuda":
            return None
        import torch

        event = torch.cuda.Event()
        event.record(streams[home])
        return event

    def pixels(self, chunk: list[Pending]):
        """A batch's (images, frames): stacked on the device when cut there (numpy views on the
        CPU), else copied out of the slots, which go back at once."""
        if chunk[0].pixels is not None:
            import torch

            images = torch.stack([p.pixels[0] for p in chunk])
            frames = torch.stack([p.pixels[1] for p in chunk])
            return (images.numpy(), frames.numpy()) if images.device.type == "cpu" else (images, frames)
        import numpy as np

        views = [self.source.view(p.slot) for p in chunk]
        images, frames = np.stack([v[0] for v in views]), np.stack([v[1] for v in views])
        self.source.free([p.slot for p in chunk])
        return images, frames


def scan(inputs: Iterable[ScanInput | tuple[str, str | None]], runner, detector, settings: ScanSettings,
         on_record: Callable[[dict, Row], None] | None = None, *, workers: int = 0, **kw) -> list[dict]:
    """Scan and return every record (small scans, tests, benchmarks; the CLI streams with ``Scanner``).

    ``detector`` is a ``faces.DetectorSpec`` (or any picklable object with ``build()`` and
    ``name``); with ``workers=0`` it may also be a detector object, used as it is."""
    import functools

    if hasattr(detector, "build"):
        factory = detector.build
    elif workers == 0:
        factory = functools.partial(_same, detector)
    else:
        raise ValueError("worker processes need a picklable detector spec with build(), e.g. faces.DetectorSpec")
    runners = runner if isinstance(runner, list) else [runner]
    items = (i if isinstance(i, ScanInput) else ScanInput(i[0], i[0], i[1]) for i in inputs)
    out: list[dict] = []

    def collect(record, row):
        out.append(record)
        if on_record:
            on_record(record, row)

    with Scanner(runners, factory, detector.name, settings, workers=workers, **kw) as scanner:
        scanner.run(items, collect)
    return out


def _same(obj):
    return obj
