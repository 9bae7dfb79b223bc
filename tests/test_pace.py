"""The pipeline at a GPU's pace (issue 32, item 6): stand-ins for preparation and the model that
take the time an H200 measured (tests/sim.py), driven by the real Scanner, which must keep the
slower of the two busy: end to end >= 0.9x the slowest stage's rate. What is tested is the
pipeline's own cost per clip and per batch (its loop, batcher, lanes, assembler), not a device."""

import time

import numpy as np
import pytest

from deepscan.scan import ScanSettings
from deepscan.scan.pipeline import Scanner
from deepscan.scan.plan import ScanInput

from .conftest import tiny_config
from .sim import SimRunner, SimSource, cores, cpu_name

# an H200, bf16, batch 128: 2,800 clips/s (../shared/GPU.md), i.e. 45.7 ms a batch
BATCH, BATCH_S = 128, 128 / 2800
WORKERS, CLIPS, VIDEOS = 16, 32, 192


def scan_at_pace(clip_s: float) -> tuple[float, float, list[int], list[dict]]:
    cfg = tiny_config()
    pixels = (np.zeros((2, 2, 3), np.uint8), np.zeros((1, 2, 2, 3), np.uint8))
    runner = SimRunner(cfg, BATCH_S)
    settings = ScanSettings(clips=CLIPS, batch_size=BATCH, hash_files=False)
    source = SimSource(WORKERS, CLIPS, clip_s, pixels)
    records = []
    with Scanner([runner], None, "sim", settings, pool=source) as scanner:
        t = time.perf_counter()
        scanner.run([ScanInput(f"/sim/video{k:04d}.mp4", f"video{k:04d}.mp4") for k in range(VIDEOS)],
                    lambda record, row: records.append(record))
        seconds = time.perf_counter() - t
    # the slower stage as it ran: preparation's sleeps run late on a busy 2-core machine
    slowest = min(source.rate(), BATCH / BATCH_S)
    return VIDEOS * CLIPS / seconds, slowest, runner.batches, records


@pytest.mark.parametrize("clip_s", [16 / 4000, 16 / 2000], ids=["model-bound", "preparation-bound"])
def test_the_scanner_keeps_the_slowest_stage_busy(clip_s):
    rate, slowest, batches, records = scan_at_pace(clip_s)
    assert len(records) == VIDEOS and all(r["verdict"] == "real" for r in records)
    assert sum(batches) == VIDEOS * CLIPS
    assert rate >= 0.9 * slowest, (
        f"{rate:.0f} clips/s end to end, the slowest stage {slowest:.0f} ({rate / slowest:.2f}x) on {cpu_name()}, "
        f"{cores()} cores; batch sizes {sorted(batches)}")
