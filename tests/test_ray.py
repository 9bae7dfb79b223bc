"""Scans and preparation on a local Ray runtime (started once for these tests): the same records
and the same cache as a local run, and every record even when an actor dies."""

import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is part of the test extra (deepscan[ray])")

from deepscan import prepare_ray  # noqa: E402
from deepscan.scan import cluster  # noqa: E402
from deepscan.faces import DetectorSpec  # noqa: E402
from deepscan.scan.plan import walk  # noqa: E402
from deepscan.scan import ScanSettings  # noqa: E402

from .detectors import PoisonSpec  # noqa: E402

pytestmark = pytest.mark.timeout(600)  # pytest-timeout: a Ray runtime that waits forever fails the test
FAST = ["--clips", "2", "--detector", "dlib", "--batch-size", "2", "--no-hash"]


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    cluster.connect("local", num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(media_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_corpus")
    for name in ("carphone.mp4", "astronaut.mp4", "two_faces.mp4", "no_face.mp4"):
        shutil.copy(media_dir / name, d / name)
    (d / "broken.mp4").write_bytes(random.Random(0).randbytes(4000))
    return d


def run(*args):
    """The command line in this process: ``--ray local`` joins the runtime started for these tests."""
    from typer.testing import CliRunner

    from deepscan.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def by_path(stdout):
    return {r["path"]: r for r in (json.loads(line) for line in stdout.splitlines())}


def test_ray_scan_agrees_with_a_local_scan_record_for_record(local_ray, corpus, tiny_ckpt, tmp_path):
    local = run("scan", corpus, "--weights", tiny_ckpt, "--json", "--precision", "fp32", *FAST)
    on_ray = run("scan", corpus, "--weights", tiny_ckpt, "--json", "--precision", "fp32", "--ray", "local",
                 "--output", tmp_path / "out.jsonl", *FAST)
    assert local.returncode == on_ray.returncode in (1, 2), on_ray.stderr[-2000:]
    a, b = by_path(local.stdout), by_path(on_ray.stdout)
    assert a.keys() == b.keys() and len(a) == 5
    assert b == by_path((tmp_path / "out.jsonl").read_text())  # --output gets the same records
    for path in a:
        ra, rb = a[path], b[path]
        assert ra["verdict"] == rb["verdict"] and (ra["error"] is None) == (rb["error"] is None), path
        if ra["score"] is not None:
            assert abs(ra["score"] - rb["score"]) < 1e-5
            fa = [f["score"] for t in ra["tracks"] for f in t["frames"]]
            fb = [f["score"] for t in rb["tracks"] for f in t["frames"]]
            np.testing.assert_allclose(fa, fb, atol=1e-5)
    assert b[str(corpus / "broken.mp4")]["verdict"] == "error"
    resumed = run("scan", corpus, "--weights", tiny_ckpt, "--json", "--ray", "local", "--output",
                  tmp_path / "out.jsonl", "--resume", *FAST)
    # only the input whose record is an error is tried again
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert [json.loads(line)["path"] for line in resumed.stdout.splitlines()] == [str(corpus / "broken.mp4")]


def test_an_actor_killed_mid_run_still_yields_every_record(local_ray, corpus, tiny_ckpt, tmp_path):
    from deepscan.checkpoint import read_info
    from deepscan.scan import model_record

    from . import media
    from .detectors import POISON_SIZE

    h, w = POISON_SIZE
    shutil.copytree(corpus, tmp_path / "c")
    media.write_video(tmp_path / "c" / "poison.mp4", [np.full((h, w, 3), 128, np.uint8)] * 6)
    marker = tmp_path / "killed-once"
    # workers=0: the detector runs inside the actor, so the poison kills the actor itself, once
    spec = PoisonSpec("kill-once", marker=str(marker))
    info = read_info(tiny_ckpt)
    inputs = list(walk([tmp_path / "c"]))
    inputs.append(inputs[0])  # a path given twice gets two records
    records = list(cluster.scan(inputs, tiny_ckpt, ScanSettings(clips=2, batch_size=2, hash_files=False),
                                spec, model=model_record(info, "x"), device="cpu", precision="fp32", workers=0))
    assert marker.exists(), "the actor was not killed"
    paths = sorted(r["path"] for r in records)
    assert paths == sorted([str(p) for p in (tmp_path / "c").iterdir()] + [inputs[0].path])
    assert {r["verdict"] for r in records if r["path"].endswith("poison.mp4")} == {"no-face"}


def test_ray_prepare_makes_the_cache_a_local_prepare_makes(local_ray, tmp_path):
    from deepscan.data import load_dataset
    from deepscan.faces import DlibDetector
    from deepscan.prepare import PrepareSettings, load_cache, prepare

    from . import media

    data = media.make_dataset(tmp_path / "data", "folders", per_split=1)
    _, items = load_dataset(data)
    settings = PrepareSettings(image_size=62, lda_size=32, clips=2)
    local = prepare(items, tmp_path / "local", DlibDetector(), settings)
    counts = prepare_ray.prepare(items, tmp_path / "ray", DetectorSpec("dlib"), settings)
    assert counts == local and counts["prepared"] == len(items)
    a, b = load_cache(tmp_path / "local", items), load_cache(tmp_path / "ray", items)
    assert [v.key for v in a] == [v.key for v in b] and [v.clips for v in a] == [v.clips for v in b]
    for va, vb in zip(a, b):
        for name in ("image.npy", "frames.npy"):
            assert np.array_equal(np.load(Path(va.folder) / name), np.load(Path(vb.folder) / name))
    assert not list((tmp_path / "ray").glob(".*tmp*"))
    again = prepare_ray.prepare(items, tmp_path / "ray", DetectorSpec("dlib"), settings)
    assert again["done_before"] == len(items) and again["prepared"] == 0


def test_plan_asks_for_no_more_than_the_cluster_has():
    p = cluster.plan_actors({"CPU": 2.0})
    assert p.actors == 1 and p.num_cpus <= 2 and p.num_gpus == 0 and p.workers >= 1 and p.threads == 2
    g = cluster.plan_actors({"CPU": 16.0, "GPU": 4.0})
    assert g.actors == 4 and g.num_gpus == 1 and g.num_cpus * 4 <= 16 and g.workers == 4


def test_ray_prepare_cli_then_train_uses_the_cache(local_ray, tmp_path):
    from . import media

    data = media.make_dataset(tmp_path / "data", "folders", per_split=1)
    cache = tmp_path / "cache"
    r = run("prepare", "--data", data, "--cache", cache, "--image-size", "62", "--lda-size", "32", "--clips", "2",
            "--detector", "dlib", "--ray", "local")
    assert r.returncode == 0, r.stderr[-2000:]
    t = run("train", "--data", data, "--cache", cache, "--out", tmp_path / "run", "--epochs", "1", "--max-steps", "1",
            "--variant", "spatial", "--image-size", "62", "--lda-size", "32", "--clips", "2", "--detector", "dlib",
            "--vit-init", "random", "--workers", "0", "--batch-size", "4")
    assert t.returncode == 0, t.stderr[-2000:]
    assert "prepared 0 video(s)" not in t.stderr  # nothing left to prepare: the Ray cache was used as is
    assert (tmp_path / "run" / "last.safetensors").is_file()


def test_a_killed_local_driver_leaves_no_ray_process_behind(corpus, tiny_ckpt, tmp_path):
    """SIGKILL of `scan --ray local`: Ray's agents and workers go with it within seconds (they
    lingered 30-70 s: only the raylet and GCS shared the driver's fate)."""
    import signal
    import subprocess
    import sys
    import time

    from deepscan.watchdog import _stat, descendants

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deepscan", "scan", str(corpus), "--ray", "local", "--weights",
                             str(tiny_ckpt), "--json", *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline(), proc.stderr.read()[-2000:]  # a record: the runtime and its actors are up
        tree = descendants(proc.pid)
        names = {pid: open(f"/proc/{pid}/cmdline", "rb").read()[:60] for pid in tree if _stat(pid)}
        assert any(b"Agent" in n for n in names.values()), names
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = {pid: names.get(pid) for pid, start in tree.items() if (_stat(pid) or (0, None))[1] == start}
            if not alive:
                break
            time.sleep(0.25)
        assert not alive, alive
    finally:
        if proc.poll() is None:
            proc.kill()
