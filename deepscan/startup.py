"""Start-up benchmarks behind ``deepscan bench --startup`` (never timed assertions in tests).

What a script that calls deepscan once per file pays, measured in child processes side by side in
one run (issue 34):

- cold CLI: ``deepscan scan one.mp4 --json`` in a fresh process, its wall time beside the record's
  own ``timings.total_s`` (the first run, which converts the model for OpenVINO, reported apart);
- imports: the scanning process's ``-X importtime`` by top-level package (torch absent on the
  OpenVINO path with a cached model);
- through a warm ``deepscan serve``: the same scan with ``--server``, wall beside ``total_s``, and
  whether its record equals the local one (timings aside);
- concurrency: N clients at once through the service beside one local folder scan of the same N
  videos, and beside that folder sent through the service by one client.

Everything runs with the bench's own cache folder (XDG_CACHE_HOME), so the first run's conversion
is measured and the user's cache is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HEAVY = ("torch", "timm", "torchvision", "openvino", "numpy", "PIL", "typer", "rich", "click", "deepscan",
         "huggingface_hub", "safetensors", "onnxruntime", "cv2", "dlib", "sklearn", "scipy", "starlette", "uvicorn", "deepscan.cli", "deepscan.scan.run",
         "deepscan.scan.score_openvino", "deepscan.faces", "deepscan.video")


def deepscan_cmd() -> list[str]:
    """The installed ``deepscan`` script beside this Python (what a user's shell runs), else ``-m``."""
    script = Path(sys.executable).with_name("deepscan")
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepscan"]


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip().startswith("{")]


def _timed(cmd: list[str], env: dict, check_codes=(0, 1)) -> tuple[float, list[dict], subprocess.CompletedProcess]:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if out.returncode not in check_codes:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[-400:]}")
    return wall, _records(out.stdout), out


def _row(wall: float, rec: dict) -> dict:
    total = rec["timings"]["total_s"]
    return {"wall_s": round(wall, 3), "total_s": total, "wall_over_total": round(wall / total, 3)}


def _summary(rows: list[dict]) -> dict:
    return {"median_wall_s": round(statistics.median(r["wall_s"] for r in rows), 3),
            "median_total_s": round(statistics.median(r["total_s"] for r in rows), 3),
            "median_wall_over_total": round(statistics.median(r["wall_over_total"] for r in rows), 3)}


def _comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "timings"}


def import_breakdown(cmd: list[str], env: dict) -> dict:
    """``-X importtime`` of the scanning process: cumulative seconds per top-level package
    (the first import of each), and the modules the start never loaded."""
    python = [sys.executable, "-X", "importtime", "-m", "deepscan"] + cmd[len(deepscan_cmd()):]
    out = subprocess.run(python, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    per: dict[str, float] = {}  # each heavy package's first import, at whatever depth
    total = 0.0
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        try:
            cum = int(cumulative) / 1e6
        except ValueError:  # the header line
            continue
        if len(name) - len(name.lstrip(" ")) <= 1:  # the top level (nested ones: two more spaces a level)
            total += cum
        if name.strip() in HEAVY and name.strip() not in per:
            per[name.strip()] = round(cum, 3)
    heavy = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    return {"total_import_s": round(total, 3), "by_package_s": heavy,
            "not_imported": [p for p in ("torch", "timm", "torchvision", "starlette", "uvicorn") if p not in per]}


class _Service:
    """``deepscan serve`` in a child process on a private socket."""

    def __init__(self, weights: Path, socket: Path, extra: list[str], env: dict) -> None:
        self.socket, self.env = socket, env
        self.cmd = deepscan_cmd()
        t = time.perf_counter()
        self.proc = subprocess.Popen([*self.cmd, "serve", "--weights", str(weights), "--socket", str(socket), *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     stdin=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deepscan serve exited {self.proc.returncode}: {self.proc.stderr.read()[-400:]}")
            status = subprocess.run([*self.cmd, "serve", "--status", "--socket", str(socket)], capture_output=True,
                                    env=env)
            if status.returncode == 0:
                break
            if time.perf_counter() - t > 300:
                self.close()
                raise RuntimeError("deepscan serve was not ready after 300 s")
            time.sleep(0.2)
        self.ready_s = round(time.perf_counter() - t, 3)

    def close(self) -> None:
        if self.proc.poll() is None:
            subprocess.run([*self.cmd, "serve", "--stop", "--socket", str(self.socket)], capture_output=True,
                           env=self.env)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def startup_bench(work: Path, repeats: int = 5, clients: int = 4, clips: int = 32, say=print,
                  extra: list[str] | None = None) -> dict:
    """The figures above for a generated 20 s 640x360 face video (the issue's one.mp4) and an
    untrained spatial-temporal checkpoint; ``extra``: scan settings given to both scan and serve."""
    from .perf import benchmark_inputs, make_folder

    extra = list(extra or [])
    work.mkdir(parents=True, exist_ok=True)
    video, weights = benchmark_inputs(work, (640, 360), 20)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # the first run converts: measured, not inherited
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "DEEPSCAN_SERVER": ""}
    env.pop("DEEPSCAN_SERVER")
    settings = ["--weights", str(weights), "--clips", str(clips), *extra]
    scan = [*deepscan_cmd(), "scan", str(video), "--json", *settings]
    result: dict = {"video": {"name": video.name, "size": "640x360", "seconds": 20}, "clips": clips,
                    "repeats": repeats, "command": " ".join(["deepscan", "scan", video.name, "--json", "--clips",
                                                             str(clips), *extra])}

    say("start-up: first cold scan (converts the model where the backend is OpenVINO)")
    wall, recs, _ = _timed(scan, env)
    result["first_run"] = _row(wall, recs[0])
    local_record = recs[0]
    result["backend"] = local_record["model"].get("backend")
    result["imports"] = import_breakdown(scan, env)

    folder = make_folder(video, work / f"clients{clients}", clients)
    service = _Service(weights, work / "bench.sock", ["--clips", str(clips), *extra], env)
    result["service_ready_s"] = service.ready_s
    try:
        via = [*deepscan_cmd(), "scan", str(video), "--json", *settings, "--server", str(service.socket)]
        cold, warm, identical = [], [], True
        for i in range(repeats):  # interleaved: a cold CLI scan, then the same through the service
            say(f"start-up: cold CLI and service scans, pair {i + 1}/{repeats}")
            wall, recs, _ = _timed(scan, env)
            cold.append(_row(wall, recs[0]))
            wall, recs, out = _timed(via, env)
            if "scans here" in out.stderr or "scanning here" in out.stderr:
                raise RuntimeError(f"the scan did not go through the service: {out.stderr.strip()[-300:]}")
            warm.append(_row(wall, recs[0]))
            identical &= _comparable(recs[0]) == _comparable(local_record)
        result["cold_cli"] = {"runs": cold, **_summary(cold)}
        result["service"] = {"runs": warm, **_summary(warm), "records_identical_to_local": identical}
        local_total = result["cold_cli"]["median_total_s"]
        result["service"]["median_wall_over_local_total"] = round(result["service"]["median_wall_s"] / local_total, 3)
        result["service"]["target_s"] = round(1.1 * local_total + 0.1, 3)

        say(f"start-up: {clients} clients at once through the service, then one folder scan of the same videos")
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            runs = list(pool.map(lambda v: _timed([*deepscan_cmd(), "scan", str(v), "--json", *settings, "--server",
                                                   str(service.socket)], env), folder))
        wall = time.perf_counter() - t
        n = sum(r["sampling"]["face_clips"] for _, recs, _ in runs for r in recs)
        result["concurrent_clients"] = {"clients": clients, "wall_s": round(wall, 3), "face_clips": n,
                                        "clips_per_s": round(n / wall, 2),
                                        "client_wall_s": [round(w, 3) for w, _, _ in runs]}
        wall, recs, _ = _timed([*deepscan_cmd(), "scan", str(folder[0].parent), "--json", *settings, "--server",
                                str(service.socket)], env)
        n = sum(r["sampling"]["face_clips"] for r in recs)
        result["folder_via_service"] = {"videos": len(recs), "wall_s": round(wall, 3), "face_clips": n,
                                        "clips_per_s": round(n / wall, 2)}
    finally:
        service.close()
    wall, recs, _ = _timed([*deepscan_cmd(), "scan", str(folder[0].parent), "--json", *settings], env)
    n = sum(r["sampling"]["face_clips"] for r in recs)
    result["folder_local"] = {"videos": len(recs), "wall_s": round(wall, 3), "face_clips": n,
                              "clips_per_s": round(n / wall, 2)}
    result["concurrent_clients"]["over_folder_local"] = round(
        result["concurrent_clients"]["clips_per_s"] / result["folder_local"]["clips_per_s"], 3)
    result["targets"] = {
        "cold_cli_wall_over_total_max": 1.5,
        "cold_cli_met": result["cold_cli"]["median_wall_over_total"] <= 1.5,
        "service_wall_max_s": result["service"]["target_s"],
        "service_met": result["service"]["median_wall_s"] <= result["service"]["target_s"],
    }
    return result
