"""A whole scan as the command line runs it: plan the inputs, start the workers, load the model,
scan, and send every record to its sinks. ``cli.scan`` parses options into a ``ScanRequest``
and renders what ``run_scan`` returns."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..checkpoint import CheckpointInfo
from ..errors import ConfigError
from .plan import open_output, plan_inputs, resume_key
from .settings import ScanSettings


@dataclass(frozen=True)
class ScanRequest:
    paths: tuple[str, ...]
    settings: ScanSettings
    weights: Path | None = None
    variant: str | None = None  # None: the checkpoint's (the manifest's best model without --weights)
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None  # None: default_workers()
    detector: str = "auto"
    glob: str | None = None
    shard: tuple[int, int] = (1, 1)  # (K, N), 1-based
    output: Path | None = None
    resume: bool = False
    heatmaps: Path | None = None
    compile: bool = False
    backend: str = "auto"  # auto | torch | openvino (score_openvino.pick_backend)
    report: Path | None = None  # --report FILE.html: the sink keeps what the page needs
    json_out: bool = False
    ray: str | None = None  # a Ray address: local, auto or host:port (see cluster.py)
    preparation: str = "auto"  # auto | workers | device (settings.choose)
    decoder: str = "auto"  # auto | ffmpeg | nvdec (settings.choose)


@dataclass
class ScanOutcome:
    sink: object  # sink.ScanSink: rows, verdicts
    info: CheckpointInfo
    checkpoint: Path
    detector: str
    interrupted: KeyboardInterrupt | None = None
    workers: int | None = None  # preparation workers started (None on Ray)
    sha256: str | None = None  # the checkpoint's


@contextlib.contextmanager
def _until_stopped(outcome: "ScanOutcome"):
    """Scanning ends early, without an error, when standard output closes (the results so far
    stand) or on Ctrl-C/SIGTERM (kept in ``outcome`` for the exit code)."""
    from .sink import OutputClosed

    try:
        yield
    except OutputClosed:
        pass
    except KeyboardInterrupt as exc:
        outcome.interrupted = exc


def _checkpoint(req: ScanRequest, manifest, say):
    """The checkpoint a scan uses (path, its sha256 when already known, its header), checked
    against an explicit --variant."""
    from ..checkpoint import read_info
    from ..output import printable
    from ..weights import resolve_checkpoint

    ckpt, ckpt_sha = resolve_checkpoint(req.variant, req.weights, manifest, say=say)
    info = read_info(ckpt)
    if req.variant is not None and req.variant != info.variant:
        raise ConfigError(f"--variant {req.variant}, but {printable(str(ckpt))} holds a {info.variant} model; "
                          "drop --variant or pass a checkpoint of that variant")
    return ckpt, ckpt_sha, info


def _with_preprocessing(req: ScanRequest, info: CheckpointInfo) -> ScanRequest:
    """The checkpoint's own way of cutting faces (margin, alignment) in the scan's settings."""
    settings = dataclasses.replace(req.settings, margin=info.crop_margin, alignment=info.alignment)
    return dataclasses.replace(req, settings=settings)


def _say_model(info: CheckpointInfo, say) -> None:
    """One line naming a trained model and its licence (an untrained one gets its warning)."""
    from ..output import printable

    if not info.untrained:
        lic = info.license or "not stated in the checkpoint"
        say(f"model: {printable(info.name)} ({info.variant}); licence: {printable(lic)}")


def _setup(req: ScanRequest, say):
    """What a local scan and a Ray scan share: the manifest, the checkpoint and its header, the
    request in the checkpoint's own preprocessing, the detector, and the model's licence said."""
    from ..faces import resolve_detector
    from ..output import warn_untrained
    from ..weights import load_manifest

    manifest = load_manifest()
    ckpt, ckpt_sha, info = _checkpoint(req, manifest, say)
    req = _with_preprocessing(req, info)
    spec = resolve_detector(req.detector, manifest=manifest, say=say)
    if info.untrained:
        warn_untrained(str(ckpt))
    _say_model(info, say)
    return req, ckpt, ckpt_sha, info, spec


def _sink(req: ScanRequest, file, say):
    from ..output import printable
    from .sink import ScanSink

    return ScanSink(json_out=req.json_out, file=file, keep_rows=not req.json_out,
                    on_error=lambda e: say(f"deepscan: {printable(e)}"), keep_items=req.report is not None)


@dataclass
class Local:
    """What a local scan runs on, set up once (``open_local``): the request in its resolved
    settings, the checkpoint, the detector, the runtime chosen and the started workers and
    model runners. ``scanner()`` wires them; ``close()`` stops what was started. A CLI scan uses
    one for one scan, ``deepscan serve`` one for its lifetime."""

    req: ScanRequest
    ckpt: Path
    info: CheckpointInfo
    spec: object  # faces.DetectorSpec (the workers build theirs from it)
    devices: list
    precision: str
    backend: str
    workers: int
    pool: object
    model_rec: dict
    runners: list = dataclasses.field(default_factory=list)

    def scanner(self, say):
        from .pipeline import Scanner

        return Scanner(self.runners, self.spec.build, self.spec.name, self.req.settings, model=self.model_rec,
                       heatmaps=self.req.heatmaps, say=say, pool=self.pool)

    def close(self) -> None:
        self.pool.close()
        for r in self.runners:
            if hasattr(r, "settle"):  # an OpenVINO start still compiling (a scan that never scored)
                r.settle()


def open_local(req: ScanRequest, say: Callable[[str], None], opened: Callable[[ScanRequest], None] | None = None
               ) -> Local:
    """Resolve ``req`` (devices, precision, backend, checkpoint, detector, preparation), start the
    preparation workers, then make the model runners (the workers start while the model loads).
    ``opened(req)`` runs once the request is resolved, before anything starts (the CLI checks its
    --output file there)."""
    from ..hashing import sha256_file
    from . import settings as choices
    from .assemble import model_record
    from .score_openvino import pick_backend

    devices = choices.pick_devices(req.device)
    precision = choices.precision_name(req.precision, devices[0])
    backend = pick_backend("torch" if req.compile and req.backend == "auto" else req.backend, devices[0])
    req, ckpt, ckpt_sha, info, spec = _setup(req, say)
    settings = choices.choose(req.settings, detector=spec.name, preparation=req.preparation, decoder=req.decoder,
                              device=devices[0], say=say)
    req = dataclasses.replace(req, settings=settings)
    if opened is not None:
        opened(req)
    gpu = devices[0].type == "cuda"
    workers = _cap_workers(req, choices.default_workers(devices) if req.workers is None else req.workers, info,
                           gpu=gpu, say=say)
    # Workers build their own detector, on one onnxruntime thread each (many workers, many
    # cores), and start now, while the model loads.
    spec = dataclasses.replace(spec, threads=1) if workers else spec
    pool = choices.start_pool(settings, info.config, spec.build, workers, devices=len(devices), gpu=gpu)
    local = Local(req, Path(ckpt), info, spec, devices, precision, backend, workers, pool, {})
    try:
        local.model_rec = model_record(info, ckpt_sha or sha256_file(ckpt), backend)
        local.runners = make_runners(ckpt, info, devices, precision, backend, key=local.model_rec["sha256"],
                                     use_compile=req.compile, batch_size=settings.batch_size, say=say)
    except BaseException:
        local.close()
        raise
    return local


def run_scan(req: ScanRequest, say: Callable[[str], None]) -> ScanOutcome:
    """Run the scan ``req`` describes. Ctrl-C (KeyboardInterrupt) and SIGTERM (raised as one by
    the caller) stop it: what is complete is kept and the interruption is returned, not raised."""
    from ..config import VARIANTS
    from ..output import progress

    if req.variant is not None and req.variant not in VARIANTS:
        raise ConfigError(f"unknown variant {req.variant!r}; choose one of: {', '.join(VARIANTS)}")
    if req.ray:
        if req.backend == "openvino":
            raise ConfigError("--backend openvino is not run on Ray yet (its actors run torch); drop one of them")
        if req.preparation == "device" or req.decoder == "nvdec":
            raise ConfigError("--preparation device is not run on Ray yet (its actors prepare in workers); "
                              "drop one of them")
        return _run_on_ray(req, say)
    output: list = [None, None]  # the --output file and its resume index, opened before anything starts

    def opened(resolved: ScanRequest) -> None:
        output[:] = open_output(resolved)

    local = None
    try:
        local = open_local(req, say, opened)
        req, (file, done) = local.req, output
        inputs = plan_inputs(req, file, done, resume_key(req, local.model_rec, local.spec.name), say)
        sink = _sink(req, file, say)
        outcome = ScanOutcome(sink, local.info, local.ckpt, local.spec.name, workers=local.workers,
                              sha256=local.model_rec["sha256"])
        known = len(req.paths) if req.shard[1] == 1 and not req.resume and not any(map(os.path.isdir, req.paths)) \
            else None
        with local.scanner(say) as scanner, progress(known, "scanning", enabled=not req.json_out) as advance:
            def on_record(record, row):
                sink(record, row)
                advance()

            with _until_stopped(outcome):
                scanner.run(inputs, on_record)
        return outcome
    finally:
        if local is not None:
            local.close()
        if output[0] is not None:
            output[0].close()


def make_runners(ckpt: Path, info: CheckpointInfo, devices: list, precision: str, backend: str, *, key: str,
                 use_compile: bool = False, batch_size: int = 8, say=None) -> list:
    """One model runner per device for the checkpoint ``ckpt`` (sha256 ``key``). On OpenVINO the
    model is loaded (torch, timm, the tensors) only when its cache holds no converted entry for
    ``key``; otherwise the IR is compiled straight from the cache and torch is never imported."""
    from ..checkpoint import load_checkpoint

    if backend == "openvino":
        from .score_openvino import OpenVinoRunner

        if use_compile:
            raise ConfigError("--compile is torch.compile: it does not apply to --backend openvino")
        return [OpenVinoRunner(lambda: load_checkpoint(ckpt)[0], precision, key=key, cfg=info.config,
                               batch_size=batch_size, say=say)]
    from .score import make_runner
    from .settings import pick_precision

    model, _ = load_checkpoint(ckpt)
    runners = [make_runner(model, devices[0], pick_precision(precision, devices[0]), backend, key=key,
                           use_compile=use_compile, batch_size=batch_size, say=say)]
    return runners + [runners[0].replica(d) for d in devices[1:]]


def _cap_workers(req: ScanRequest, workers: int, info, *, gpu: bool, say) -> int:
    """No more workers than inputs (when the arguments are all files) and than memory allows: each
    worker holds its slots of shared memory (~60 MB at the model's crop sizes on CPU) and a
    process of its own (~150 MB)."""
    if workers <= 1:
        return workers
    if req.paths and not any(os.path.isdir(p) for p in req.paths):
        workers = min(workers, len(req.paths))
    from .settings import slots_for
    from .workers import available_memory

    per_worker = slots_for(req.settings, workers, gpu) * req.settings.prep(info.config).slot_bytes + (150 << 20)
    avail = available_memory()
    if avail:
        fit = max(1, int(avail * 0.5 // per_worker))
        if fit < workers:
            say(f"note: {fit} preparation worker(s) instead of {workers}: each needs ~{per_worker >> 20} MB and "
                f"{avail >> 20} MB of memory is available")
            workers = fit
    return workers


def _run_on_ray(req: ScanRequest, say) -> ScanOutcome:
    """The same scan through Ray actors (cluster.py): same records, same sinks; any order."""
    from ..hashing import sha256_file
    from ..output import progress
    from . import cluster
    from .assemble import model_record, row_of

    req, ckpt, ckpt_sha, info, spec = _setup(req, say)
    spec = dataclasses.replace(spec, threads=1, providers=None)  # each actor picks its own providers
    model_rec = model_record(info, ckpt_sha or sha256_file(ckpt))
    resources = cluster.connect(req.ray)
    file, done = open_output(req)
    sink = _sink(req, file, say)
    outcome = ScanOutcome(sink, info, Path(ckpt), spec.name, sha256=model_rec["sha256"])
    say(f"ray: {int(resources.get('CPU', 0))} CPU(s), {int(resources.get('GPU', 0))} GPU(s) in the cluster")
    try:
        inputs = plan_inputs(req, file, done, resume_key(req, model_rec, spec.name), say)
        with progress(None, "scanning", enabled=not req.json_out) as advance:
            with _until_stopped(outcome):
                for record in cluster.scan(inputs, ckpt, req.settings, spec, model=model_rec, device=req.device,
                                           precision=req.precision, workers=req.workers, heatmaps=req.heatmaps,
                                           say=say):
                    sink(record, row_of(record))
                    advance()
        return outcome
    finally:
        if file is not None:
            file.close()
