"""The fault drill: kill preparation workers and the whole scan on purpose, and count what is left.

For each preparation (workers; device): a folder of 8 face videos and one broken file, scanned
with ``--workers 2 --output``; one worker is SIGKILLed before the first record and another after
it. Then a scan whose process group is SIGKILLed after its first record. Reported: records per
input (each path once), exit code, tracebacks, processes left 3 s after the end, new /dev/shm
entries. Usage: ``python benchmarks/fault_drill.py [--out FILE.json]`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import media  # noqa: E402
from tests.test_pipeline import cmdline, descendants  # noqa: E402
from tests.test_pipeline import workers_of as _children_of_fork_servers  # noqa: E402


def workers_of(scan_pid: int) -> list[int]:
    """The preparation workers (forked from the fork server, so their command line names it too),
    not the ffmpeg processes they run."""
    return [p for p in _children_of_fork_servers(scan_pid) if "forkserver" in cmdline(p)]


def start(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deepscan", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def kill_drill(folder: Path, ckpt: Path, out: Path, preparation: str) -> dict:
    """A worker killed before the first record, another after it."""
    args = [str(folder), "--weights", str(ckpt), "--workers", "2", "--output", str(out), "--clips", "4",
            "--detector", "blazeface", "--preparation", preparation, "--json"]
    proc = start(args)
    kills = []
    if wait_for(lambda: len(workers_of(proc.pid)) >= 2, 60):
        os.kill(workers_of(proc.pid)[0], signal.SIGKILL)
        kills.append("before the first record")
    if wait_for(lambda: records_of(out), 120):
        ws = workers_of(proc.pid)
        if ws:
            os.kill(ws[-1], signal.SIGKILL)
            kills.append("after the first record")
    stdout, stderr = proc.communicate(timeout=600)
    time.sleep(3)
    recs = records_of(out)
    paths = [r["path"] for r in recs]
    return {"preparation": preparation, "kills": kills, "exit": proc.returncode, "records": len(recs),
            "inputs": len(list(folder.iterdir())), "each_path_once": len(set(paths)) == len(paths),
            "errors": sorted({(r["error"] or "")[len(r["path"]) + 2:][:90] for r in recs if r["verdict"] == "error"}),
            "traceback": "Traceback" in stderr, "left": [cmdline(p)[:80] for p in descendants(proc.pid)]}


def group_kill(folder: Path, ckpt: Path, out: Path) -> dict:
    """The scan's whole process group SIGKILLed after the first record."""
    before = set(os.listdir("/dev/shm"))
    proc = start([str(folder), "--weights", str(ckpt), "--workers", "2", "--output", str(out), "--clips", "4",
                  "--json"], start_new_session=True)
    wait_for(lambda: records_of(out), 180)
    session = [proc.pid, *descendants(proc.pid)]  # the scan, its fork server, workers, ffmpeg
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    time.sleep(3)
    left = [p for p in session if os.path.exists(f"/proc/{p}") and cmdline(p)]
    return {"records_before_kill": len(records_of(out)), "processes": len(session), "left": left,
            "new_in_dev_shm": sorted(set(os.listdir("/dev/shm")) - before)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deepscan-drill-"))
    try:
        folder = work / "videos"
        folder.mkdir()
        media.face_video(folder / "v0.mp4", frames=90)
        for i in range(1, 8):
            shutil.copy(folder / "v0.mp4", folder / f"v{i}.mp4")
        (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
        ckpt = work / "untrained.safetensors"
        subprocess.run([sys.executable, "-m", "deepscan", "weights", "init", "--out", str(ckpt), "--variant",
                        "spatial-temporal"], check=True, capture_output=True)
        result = {"workers": kill_drill(folder, ckpt, work / "w.jsonl", "workers"),
                  "device": kill_drill(folder, ckpt, work / "d.jsonl", "device"),
                  "group_kill": group_kill(folder, ckpt, work / "g.jsonl")}
        text = json.dumps(result, indent=2)
        print(text)
        if a.out:
            a.out.write_text(text + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
