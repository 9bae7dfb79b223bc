"""Scans and preparation on a Ray cluster, with Ray Data (``pip install 'deepscan[ray]'``).

The same pipeline as a local scan runs inside Ray actors: each ``ScanActor`` holds one model
replica (on its GPU, or on CPU) and its own preparation worker processes, and is fed paths
(``ray.data.from_items``) through ``map_batches(..., compute=ActorPoolStrategy(...))``. Only
paths go in and JSON records come out: decoded frames and face crops never travel through
Ray's object store. The driver expands, shards and resumes the inputs as a local scan does and
writes the records exactly as a local scan does; their order may differ.

Failures: a bad input gives an ``error`` record inside the actor, as locally; an actor that
dies is restarted by Ray and the batch it held is tried once more; a batch that fails twice
gives ``error`` records for its inputs (the job goes on).

Preparation for training on Ray (``deepscan prepare --ray``) is ``prepare_ray``'s, on the same
``connect``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import ConfigError, DeepscanError

TASK_RETRIES = 1  # a batch whose actor died is tried once more, on the restarted actor


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'deepscan[ray]'") from None
    return ray


def connect(address: str, *, num_cpus: float | None = None) -> dict:
    """Join (or start) a Ray runtime: ``local`` starts one on this machine, ``auto`` joins the
    cluster the environment points to (RAY_ADDRESS or a running ``ray start``), anything else is
    a cluster address. Returns the cluster's resources."""
    ray = _ray()
    if not ray.is_initialized() and address not in ("local", "auto"):
        _reachable(address)
    if not ray.is_initialized():
        quiet = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                     configure_logging=True)
        try:
            if address == "local":
                from .. import watchdog
                from .workers import cpu_count

                watchdog.start()  # a local runtime ends with this process, however it ends (SIGKILL too)
                ray.init(num_cpus=num_cpus or cpu_count(), **quiet)
            else:
                ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"--ray {address}: cannot start or reach a Ray cluster ({first})") from None
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # deepscan prints its own progress; stdout stays results only
    ctx.max_errored_blocks = -1  # a batch that fails twice costs its inputs, not the job (see run_scan)
    return dict(ray.cluster_resources())


REACH_TIMEOUT_S = 10.0  # an address where nothing answers fails within this time (Ray itself waits forever)


def _reachable(address: str) -> None:
    """Fail fast, in one line, when nothing listens at a cluster address (``host:port`` or
    ``ray://host:port``): ``ray.init`` would retry for ever, printing its C++ log."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray {address}: give local, auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"--ray {address}: nothing answers there ({why}, within {REACH_TIMEOUT_S:.0f} s); start "
                          "the cluster (`ray start --head`) or check the address") from None


@contextlib.contextmanager
def _remote_args_allowed():
    """Ray 2.60 warns that ``max_task_retries``/``max_restarts`` as map_batches keywords go away
    in 2.64 but names no replacement; without them Ray Data retries a dying actor's batch forever
    (an input that kills its actor would never end). Hence ray<2.64 in the ray extra."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        yield


@dataclass(frozen=True)
class ActorPlan:
    """How many scan actors, and what each asks Ray for."""

    actors: int
    num_gpus: float
    num_cpus: float  # fractional: never more slots than the cluster has (Ray would wait forever)
    workers: int  # preparation worker processes inside each actor
    batch: int  # inputs per call of an actor
    threads: int  # the model's CPU threads: the cores the actor is meant to use, not its Ray request


def plan_actors(resources: dict, workers: int | None = None, max_actors: int | None = None) -> ActorPlan:
    """One actor per GPU; without GPUs one per 4 CPUs. Each asks for a share of the CPUs that
    leaves room for Ray Data's own tasks, and runs that many preparation workers (at least one)."""
    cpus = float(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    actors = gpus if gpus else max(1, int(cpus // 4))
    if max_actors:
        actors = max(1, min(actors, max_actors))
    share = cpus / actors
    return ActorPlan(actors=actors, num_gpus=1.0 if gpus else 0.0, num_cpus=round(max(0.25, 0.75 * share), 2),
                     workers=workers if workers is not None else max(1, math.floor(share) - (0 if gpus else 1)),
                     batch=16 if gpus else 4, threads=max(1, math.floor(share)))


class ScanActor:
    """A Ray actor running the local scan pipeline (preparation workers + one model replica)."""

    def __init__(self, checkpoint: str, settings, detector, workers: int, device: str, precision: str,
                 model: dict, heatmaps: str | None, threads: int = 0):
        import torch

        from ..checkpoint import load_checkpoint
        from .pipeline import Scanner
        from .score import Runner
        from .settings import pick_devices, pick_precision

        if threads:
            # Ray sets OMP_NUM_THREADS to the actor's (fractional, rounded down) CPU request, 1 on a
            # small node: the model ran on one thread, a scan took 2.06x as long as a local one.
            torch.set_num_threads(threads)

        model_obj, info = load_checkpoint(checkpoint)
        dev = pick_devices(device)[0]  # Ray has set CUDA_VISIBLE_DEVICES to this actor's GPU
        runner = Runner(model_obj, dev, pick_precision(precision, dev), batch_size=settings.batch_size)
        self.scanner = Scanner([runner], detector.build, detector.name, settings, workers=workers, model=model,
                               heatmaps=Path(heatmaps) if heatmaps else None)

    def __call__(self, batch: dict) -> dict:
        from ..output import json_line
        from .plan import ScanInput

        records: list[str] = []
        items = [ScanInput(str(p), str(k)) for p, k in zip(batch["path"], batch["key"])]
        self.scanner.run(items, lambda rec, row: records.append(json_line(rec)))  # one per input, in order
        return {"record": records, "id": [int(i) for i in batch["id"]]}


def scan(inputs: Iterable, checkpoint: str | os.PathLike, settings, detector, *, model: dict,
         device: str = "auto", precision: str = "auto", workers: int | None = None, heatmaps=None,
         max_actors: int | None = None, say: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Records of ``inputs`` (``ScanInput``s) scanned by Ray actors, as they arrive (any order).
    Inputs known to be bad before reading (``error`` set) get their record from the driver."""
    from ray.data import ActorPoolStrategy, from_items

    from .assemble import error_record

    resources = _ray().cluster_resources()
    plan = plan_actors(resources, workers, max_actors)
    if say:
        say(f"ray: {plan.actors} scan actor(s), {plan.workers} preparation worker(s) each, "
            f"{'1 GPU' if plan.num_gpus else f'{plan.num_cpus} CPU'} each")
    items, sent = [], {}
    for inp in inputs:
        if inp.error:
            yield error_record(inp.path, inp.error, settings=settings, model=model, detector=detector.name)
        else:
            # an id per input, not its path: a path given twice gets two records
            items.append({"path": inp.path, "key": inp.key, "id": len(items)})
            sent[len(items) - 1] = inp.path
    if not items:
        return
    with _remote_args_allowed():
        ds = from_items(items).map_batches(
            ScanActor,
            fn_constructor_kwargs=dict(checkpoint=str(checkpoint), settings=settings, detector=detector,
                                       workers=plan.workers, device="cuda" if plan.num_gpus else "cpu",
                                       precision=precision if plan.num_gpus or precision != "fp16" else "auto",
                                       model=model, heatmaps=str(heatmaps) if heatmaps else None,
                                       threads=0 if plan.num_gpus else plan.threads),
            batch_size=min(plan.batch, max(1, -(-len(items) // plan.actors))),
            compute=ActorPoolStrategy(min_size=1, max_size=plan.actors),
            num_gpus=plan.num_gpus, num_cpus=plan.num_cpus,
            max_task_retries=TASK_RETRIES, max_restarts=-1,
        )
    got: set[int] = set()
    try:
        for row in ds.iter_rows():
            rec = json.loads(row["record"])
            got.add(int(row["id"]))
            yield rec
    except DeepscanError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray wraps actor failures in its own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DeepscanError(f"the Ray job failed ({type(exc).__name__}: {first})") from None
    # batches that failed twice (max_errored_blocks): their inputs still get a record
    from ..output import printable

    for i in sorted(set(sent) - got):
        path = sent[i]
        yield error_record(printable(path), f"{printable(path)}: the Ray actor scanning it died twice; skipped",
                           settings=settings, model=model, detector=detector.name)
