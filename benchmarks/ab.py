"""Two source trees side by side on this machine, interleaved (old, new, old, new...), so that a
machine whose speed drifts within the hour weighs on both alike: preparation with 1 and 2 workers,
a folder end to end against the model alone (``folder_ratio.py``), and a scan's peak memory with
16 and 160 inputs (``memory.py``). Each tree runs its own code (PYTHONPATH) and its own scripts.

    git worktree add /tmp/old <commit>
    python benchmarks/ab.py --old /tmp/old --new . [--rounds 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREP = """
import json, sys, tempfile
from pathlib import Path
import dataclasses
from deepscan.faces import resolve_detector
from deepscan.perf import benchmark_inputs, make_folder, preparation_throughput
try:
    from deepscan.scan.workers import PrepSettings
except ImportError:  # a tree from before deepscan/scan/
    from deepscan.workers import PrepSettings
work = Path(sys.argv[1])
src, _ = benchmark_inputs(work, (1280, 720), 10)
videos = make_folder(src, work / "prep4", 4)
spec = dataclasses.replace(resolve_detector("blazeface", say=lambda m: None), threads=1)
rows = preparation_throughput(videos, spec, PrepSettings(clips=32, hash_files=False),
                              [1, 2], say=lambda m: None)
print(json.dumps(rows))
"""


def run(tree: Path, args: list[str], work: Path) -> dict | list:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=work, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{tree}: {' '.join(args[:2])} failed:\n{r.stderr[-3000:]}")
    decoder, out, pos, result = json.JSONDecoder(), r.stdout, 0, None
    while True:  # the last JSON value printed (scripts print progress lines before their result)
        starts = [i for i in (out.find("{", pos), out.find("[", pos)) if i >= 0]
        if not starts:
            break
        result, pos = decoder.raw_decode(out, min(starts))
    return {"seconds": round(time.perf_counter() - t, 1), "result": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deepscan-ab-"))
    trees = {"old": a.old.resolve(), "new": a.new.resolve()}
    out: dict = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "rounds": []}
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for k in range(a.rounds):
        for name, tree in trees.items():
            print(f"round {k + 1}: {name}", file=sys.stderr, flush=True)
            row = {"tree": name, "round": k + 1,
                   "preparation": run(tree, ["-c", PREP, str(work / "prep")], work),
                   "folder": run(tree, [str(tree / "benchmarks" / "folder_ratio.py"), "--pairs", "1", "--videos",
                                        str(a.videos), "--work", str(work / "folder")], work),
                   "memory": run(tree, [str(tree / "benchmarks" / "memory.py"), "--counts", "16,160", "--repeat", "1",
                                        "--workdir", str(work / "memory")], work)}
            out["rounds"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
