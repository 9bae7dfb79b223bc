"""Stress benchmark (not a test): a scan that is killed, interrupted and resumed loses nothing.

Builds a folder of ``--inputs`` files mixing good face videos, broken files (random bytes,
truncated, empty), unreadable ones (broken links, link loops) and FIFOs, then runs cycles of
``deepscan scan DIR --output R --resume``: during each, a random preparation worker is SIGKILLed
every few seconds, and every cycle but the last is stopped with SIGINT after a random time. The
last cycle runs to the end, still with kills, and one more ``--resume`` without kills retries what
the kills cost. Checks, printed as one JSON object:

- every input has a record, and its last record is final (``fake``/``real``/``no-face``) for each
  good video and ``error`` for each bad input;
- no input has two final records (nothing scanned twice once done);
- every line of the output file is a complete record;
- no scan left a worker process, and nothing new is left in /dev/shm.

    python benchmarks/stress.py [--inputs 200] [--cycles 4] [--kill-every 3] [--workers 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepscan.perf import emit  # noqa: E402

FINAL = ("fake", "real", "no-face")


def children(pid: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                out[int(fields[1])].append(int(entry))
    return out


def workers_of(pid: int) -> list[int]:
    """The children of the scan's fork server: its preparation workers."""
    tree = children(pid)
    out = []
    for c in tree.get(pid, []):
        try:
            if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes():
                out += tree.get(c, [])
        except OSError:
            pass
    return out


def make_inputs(folder: Path, count: int, rng: random.Random) -> dict[str, str]:
    """``count`` inputs; returns path -> "good" | "bad"."""
    from tests import media

    folder.mkdir(parents=True, exist_ok=True)
    src = media.face_video(folder.parent / "face.mp4", frames=60)
    kinds: dict[str, str] = {}
    for i in range(count):
        kind = rng.choices(["good", "noise", "truncated", "empty", "dangling", "loop", "fifo"],
                           [12, 2, 2, 1, 1, 1, 1])[0]
        p = folder / f"in{i:04d}.mp4"
        if kind == "good":
            os.link(src, p)
        elif kind == "noise":
            p.write_bytes(rng.randbytes(20_000))
        elif kind == "truncated":
            p.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
        elif kind == "empty":
            p.touch()
        elif kind == "dangling":
            p.symlink_to(folder / "nowhere.mp4")
        elif kind == "loop":
            p.symlink_to(p.name)
        else:
            os.mkfifo(p)
        kinds[str(p)] = "good" if kind == "good" else "bad"
    return kinds


def cycle(folder: Path, out: Path, weights: Path, workers: int, kill_every: float, stop_after: float | None,
          rng: random.Random) -> dict:
    args = [sys.executable, "-m", "deepscan", "scan", str(folder), "--weights", str(weights), "--output", str(out),
            "--resume", "--json", "--workers", str(workers), "--clips", "4", "--batch-size", "4", "--detector",
            "dlib", "--no-hash"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0, kills, seen = time.monotonic(), 0, set()
    next_kill = t0 + rng.uniform(0.5, 1.5) * kill_every if kill_every else float("inf")
    interrupted = False
    while proc.poll() is None:
        now = time.monotonic()
        for w in workers_of(proc.pid):
            seen.add(w)
        if now >= next_kill:
            victims = workers_of(proc.pid)
            if victims:
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            next_kill = now + rng.uniform(0.5, 1.5) * kill_every
        if stop_after is not None and now - t0 >= stop_after and not interrupted:
            proc.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.05)
    err = proc.stderr.read()
    time.sleep(1.0)
    left = [w for w in seen if Path(f"/proc/{w}").exists() and "Z" not in _state(w)]
    return {"rc": proc.returncode, "kills": kills, "interrupted": interrupted, "seconds": round(time.monotonic() - t0, 1),
            "workers_left": len(left), "traceback": "Traceback" in err}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--kill-every", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deepscan-stress-"))
    folder, records = work / "inputs", work / "records.jsonl"
    kinds = make_inputs(folder, args.inputs, rng)
    weights = work / "untrained.safetensors"
    subprocess.run([sys.executable, "-m", "deepscan", "weights", "init", "--out", str(weights)], check=True,
                   capture_output=True)
    shm_before = set(os.listdir("/dev/shm"))
    runs = []
    for k in range(args.cycles):
        last = k == args.cycles - 1
        runs.append(cycle(folder, records, weights, args.workers, args.kill_every,
                          None if last else rng.uniform(8, 20), rng))
    runs.append(cycle(folder, records, weights, args.workers, 0, None, rng))  # retries what the kills cost
    lines = records.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # raises if any line is not complete JSON
    by_path: dict[str, list[dict]] = defaultdict(list)
    for r in parsed:
        by_path[r["path"]].append(r)
    missing = [p for p in kinds if p not in by_path]
    wrong = [p for p, k in kinds.items() if p in by_path
             and (by_path[p][-1]["verdict"] in FINAL) != (k == "good")]
    twice = [p for p, rs in by_path.items() if sum(r["verdict"] in FINAL for r in rs) > 1]
    shm_left = sorted(set(os.listdir("/dev/shm")) - shm_before)
    result = {
        "benchmark": "stress", "inputs": len(kinds), "good": sum(k == "good" for k in kinds.values()),
        "cycles": len(runs), "interrupted_cycles": sum(r["interrupted"] for r in runs),
        "worker_kills": sum(r["kills"] for r in runs), "records": len(parsed),
        "last_verdicts": dict(Counter(rs[-1]["verdict"] for rs in by_path.values())),
        "missing": len(missing), "wrong_last_record": len(wrong), "final_twice": len(twice),
        "workers_left": sum(r["workers_left"] for r in runs), "shm_left": shm_left,
        "tracebacks": sum(r["traceback"] for r in runs), "runs": runs,
    }
    result["ok"] = not (missing or wrong or twice or shm_left or result["workers_left"] or result["tracebacks"])
    emit(result, args.out)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
