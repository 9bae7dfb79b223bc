"""Long runs as a user drives them: --output and --resume after a crash, signals, shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepscan.scan.plan import ResumeIndex, ScanInput, in_shard, parse_shard, settings_key, shard_of, walk
from deepscan.errors import ConfigError

FAST = ["--clips", "2", "--detector", "dlib", "--batch-size", "2", "--no-hash"]


def _default_sigint() -> None:
    # A suite started in the background of a non-interactive shell (`bash .ci/run &`, nohup)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler: the scan
    # would rightly ignore the Ctrl-C of the signal test. Give the child the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "deepscan", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint, **kw)


def run(*args):
    return subprocess.run([sys.executable, "-m", "deepscan", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def folder(media_dir, tmp_path_factory):
    """Ten short face videos in two sub-folders (names differ, content repeats)."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(10):
        sub = d / ("a" if i < 5 else "b")
        sub.mkdir(exist_ok=True)
        shutil.copy(media_dir / ("astronaut.mp4" if i % 2 else "two_faces.mp4"), sub / f"v{i}.mp4")
    return d


def wait_for_lines(path: Path, n: int, proc, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no records appeared")


def test_resume_after_sigkill_gives_exactly_one_record_per_input(folder, tiny_ckpt, tmp_path):
    out = tmp_path / "records.jsonl"
    proc = start(folder, "--weights", tiny_ckpt, "--output", out, "--workers", "1", *FAST)
    wait_for_lines(out, 2, proc)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.communicate()
    first = out.read_bytes().count(b"\n")
    assert 2 <= first < 10, "the scan should have been killed half-way"
    with open(out, "ab") as f:
        f.write(b'{"schema": "deepscan.scan/1", "path": "' + str(folder).encode())  # a torn last line
    r = run(folder, "--weights", tiny_ckpt, "--output", out, "--resume", "--json", "--workers", "1", *FAST)
    assert r.returncode in (0, 1), r.stderr
    assert "dropped a torn last line" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stdout.splitlines()) == 10 - first  # only the new ones are scanned and printed
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is complete JSON
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in folder.rglob("*.mp4"))
    again = run(folder, "--weights", tiny_ckpt, "--output", out, "--resume", "--json", *FAST)
    assert again.returncode == 0 and again.stdout == "" and out.read_text().splitlines() == lines


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_stops_the_scan_cleanly_and_keeps_what_is_complete(folder, tiny_ckpt, tmp_path, sig, code):
    out = tmp_path / "records.jsonl"
    proc = start(folder, "--weights", tiny_ckpt, "--output", out, "--json", "--workers", "1",
                 "--report", tmp_path / "page.html", *FAST)
    first = proc.stdout.readline()
    assert json.loads(first)["schema"] == "deepscan.scan/1"
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    printed = [json.loads(line) for line in [first, *rest.splitlines()]]
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(printed) < 10 and [r["path"] for r in printed] == [r["path"] for r in saved]
    assert out.read_bytes().endswith(b"\n")
    assert "Traceback" not in err and "terminate called" not in err
    assert err.strip().splitlines()[-1] == {130: "deepscan: interrupted", 143: "deepscan: terminated",
                                            129: "deepscan: hung up"}[code]
    assert "interrupted" in (tmp_path / "page.html").read_text()  # the page of what was finished is written


def test_shards_partition_the_inputs_stably(folder, tmp_path):
    everything = sorted(i.key for i in walk([folder]))
    parts = [sorted(i.key for i in in_shard(walk([folder]), k, 3)) for k in (1, 2, 3)]
    assert sorted(sum(parts, [])) == everything and sum(map(len, parts)) == len(everything)
    moved = tmp_path / "elsewhere" / "mount"
    shutil.copytree(folder, moved)  # the same tree under another mount point
    assert [sorted(i.key for i in in_shard(walk([moved]), k, 3)) for k in (1, 2, 3)] == parts
    assert shard_of("a/v1.mp4", 7) == shard_of("a/v1.mp4", 7) and parse_shard("2/7") == (2, 7)
    for bad in ("0/3", "4/3", "x", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_shard_runs_cover_the_folder_exactly_once(folder, tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from deepscan.cli import app

    seen = []
    for k in (1, 2):
        r = CliRunner().invoke(app, ["scan", str(folder), "--weights", str(tiny_ckpt), "--json", "--shard", f"{k}/2",
                                     *FAST])
        assert r.exit_code in (0, 1), r.output
        seen.append({json.loads(line)["path"] for line in r.stdout.splitlines()})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {str(p) for p in folder.rglob("*.mp4")}


def test_resume_index_matches_path_settings_and_stat_or_content(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(b"video a")
    b.write_bytes(b"video b")
    st = a.stat()
    from deepscan.hashing import sha256_file

    rec = {"path": str(a), "sha256": sha256_file(a), "verdict": "real", "model": {"sha256": "m"}, "threshold": 0.5,
           "aggregation": "mean", "detector": "dlib", "settings": {"clips": 32, "min_face": 24},
           "file": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}}
    key = settings_key(rec)
    index = ResumeIndex([rec])
    assert index.done(ScanInput(str(a), "a.mp4"), key)
    assert not index.done(ScanInput(str(b), "b.mp4"), key)  # another path
    assert not index.done(ScanInput(str(a), "a.mp4"), settings_key({**rec, "threshold": 0.6}))
    assert not index.done(ScanInput(str(a), "a.mp4"), settings_key({**rec, "model": {"sha256": "other"}}))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: still done
    assert index.done(ScanInput(str(a), "a.mp4"), key)
    shutil.copy(a, tmp_path / "copy.mp4")  # the same bytes under another name get their own record
    assert not index.done(ScanInput(str(tmp_path / "copy.mp4"), "copy.mp4"), key)
    index.add({**rec, "verdict": "error"})  # the last record of a path counts: an error is retried
    assert not index.done(ScanInput(str(a), "a.mp4"), key) and index.retried() == 1
    assert index.other_settings(settings_key({**rec, "detector": "scrfd"})) == 0


def test_first_result_of_a_tree_comes_before_the_walk_ends(tmp_path):
    for i in range(3):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "v.mp4").touch()
    it = walk([tmp_path])
    assert next(it).key == "d0/v.mp4"  # produced lazily, one folder at a time
