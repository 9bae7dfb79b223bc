"""A scan: inputs in, one record per input out, at any scale on one machine (or on Ray).

The stages, top to bottom (each imports only those below it; ``.importlinter`` checks it in CI,
and docs/pipeline.md tells who owns what):

    run        the request as the CLI gives it; the local and the Ray path, one set-up
    cluster    Ray actors running the same pipeline
    pipeline   the Scanner: the stages wired, one loop
    sink       stdout JSON Lines, --output, the table's rows, the report's items
    assemble   per-video state, the verdict, the record (one builder), input order
    device     preparation on the model's device (DeviceStage), PIL's resampling as matrices
    nvdec      NVDEC decoding, a Source in front of the workers
    score      the model's runners (torch; OpenVINO in score_openvino, converted by export_openvino)
    lanes      the threads that score batches
    batcher    when a batch leaves (pure)
    settings   ScanSettings, and the one place that picks devices, preparation, decoder
    plan       inputs, shards, resume
    workers    the torch-free preparation processes and their pool (a Source)
    events     typed events, handles, the run/stall rule, the waker, the Source protocol

This package's root imports nothing heavy: names below are loaded on first use, so neither
``deepscan --help`` nor a preparation worker (which imports ``deepscan.scan.workers``) pays for
torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    # settings
    "ScanSettings": "settings", "AGGREGATIONS": "settings", "PREPARATIONS": "settings", "pick_device": "settings",
    "pick_devices": "settings", "pick_precision": "settings", "pick_decoder": "settings",
    "pick_preparation": "settings", "cpu_has_bf16": "settings", "default_batch_size": "settings",
    "default_workers": "settings", "slots_for": "settings", "start_pool": "settings", "choose": "settings",
    # workers
    "cpu_count": "workers", "PrepSettings": "workers", "PreparePool": "workers",
    # scoring
    "Runner": "score", "make_runner": "score", "compile_model": "score", "CPU_STEP": "score",
    "cpu_lanes": "lanes", "model_lanes": "lanes", "score_in_lanes": "lanes", "release_free_memory": "lanes",
    # assembly
    "SCHEMA": "assemble", "Row": "assemble", "FrameScore": "assemble", "VideoState": "assemble",
    "Assembler": "assemble", "model_record": "assemble", "error_record": "assemble", "build_record": "assemble",
    "row_of": "assemble", "exit_code": "assemble", "aggregate": "assemble", "CONFIRM_SINGLE": "assemble",
    # the scanner
    "Scanner": "pipeline", "scan": "pipeline",
    "ScanInput": "plan",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
