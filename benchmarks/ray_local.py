"""Ray benchmark (not a test): what running a scan through Ray Data costs on one machine.

Scans a folder of generated 720p face videos twice with the real CLI, in fresh processes:
`deepscan scan DIR --json` and `deepscan scan DIR --json --ray local`, and prints one JSON
object with the wall time of each (Ray's includes starting its runtime and the scan actor,
which loads the model) and whether the two agree record for record (verdicts equal, scores
within 1e-5). On one small machine Ray only adds overhead; it pays off when there are more
machines or GPUs than one process can use.

    python benchmarks/ray_local.py [--videos 8] [--clips 8] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepscan.perf import benchmark_inputs, emit, make_folder  # noqa: E402


def timed_scan(folder: Path, weights: Path, clips: int, extra: list[str]) -> tuple[float, dict[str, dict]]:
    cmd = [sys.executable, "-m", "deepscan", "scan", str(folder), "--weights", str(weights), "--json",
           "--clips", str(clips), "--no-hash", "--detector", "dlib", *extra]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if out.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-2000:]}")
    records = {}
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        records[Path(rec["path"]).name] = rec
    return seconds, records


def agree(a: dict[str, dict], b: dict[str, dict]) -> bool:
    if a.keys() != b.keys():
        return False
    for name, ra in a.items():
        rb = b[name]
        if ra["verdict"] != rb["verdict"]:
            return False
        if (ra["score"] is None) != (rb["score"] is None):
            return False
        if ra["score"] is not None and abs(ra["score"] - rb["score"]) > 1e-5:
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deepscan-ray-"))
    src, weights = benchmark_inputs(work, (1280, 720), seconds=10)
    folder = work / f"videos{args.videos}"
    make_folder(src, folder, args.videos)
    local_s, local = timed_scan(folder, weights, args.clips, [])
    print(f"local: {local_s:.1f} s", file=sys.stderr)
    ray_s, on_ray = timed_scan(folder, weights, args.clips, ["--ray", "local"])
    print(f"ray local: {ray_s:.1f} s", file=sys.stderr)
    result = {"videos": args.videos, "clips": args.clips, "cores": os.cpu_count(),
              "local_s": round(local_s, 1), "ray_local_s": round(ray_s, 1),
              "ray_over_local": round(ray_s / local_s, 2), "records_agree": agree(local, on_ray)}
    emit(result, args.out)


if __name__ == "__main__":
    main()
