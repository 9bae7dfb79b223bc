"""Memory benchmark (not a test): does a scan's peak RSS depend on the number of inputs?

Scans a folder of 16 and then of 160 short generated face videos with `deepscan scan`, in a
fresh process each time, in the mode that keeps the most per video (the summary table, plus
heatmaps), and prints one JSON object: the peak RSS of the largest process of each scan (the
scanning process; workers are smaller) and the difference of the medians. The target is < 50 MB.

The peak is set by the model's transient activations and by how glibc's allocator happens to
place them: it varies by +-50 MB between identical runs (measured: 1363 and 1456 MB for the same
16 videos), more than anything per video. So each count runs ``--repeat`` times and the medians
are compared.

    python benchmarks/memory.py [--counts 16,160] [--repeat 3] [--clips 2] [--workers N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepscan.perf import benchmark_inputs, emit, make_folder, scan_peak_rss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="16,160")
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deepscan-memory-"))
    src, weights = benchmark_inputs(work, (640, 360), seconds=2)
    result = {"clips": args.clips, "mode": "table + --heatmaps", "runs": []}
    medians = []
    for count in (int(c) for c in args.counts.split(",")):
        folder = work / f"videos{count}"
        make_folder(src, folder, count)
        extra = ["--heatmaps", str(work / f"heat{count}")]
        if args.workers is not None:
            extra += ["--workers", str(args.workers)]
        peaks = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            run = scan_peak_rss(folder, weights, args.clips, extra=extra, json_out=False)
            run.update(videos=count, seconds=round(time.perf_counter() - t, 1))
            result["runs"].append(run)
            peaks.append(run["peak_rss_mb"])
            print(json.dumps(run), file=sys.stderr)
        medians.append(statistics.median(peaks))
    result["median_peak_rss_mb"] = medians
    result["difference_mb"] = round(max(medians) - min(medians), 1)
    result["target_mb"] = 50
    emit(result, args.out)


if __name__ == "__main__":
    main()
