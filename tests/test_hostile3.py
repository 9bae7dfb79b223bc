"""The third hostile round: names that rewrite the terminal, outputs that eat files, resumes
that mix models, costs that run away, arguments and data sets that gave tracebacks."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from .conftest import under_file_size_limit
from .test_hostile import FAST, cli, one_line_error, run

HOSTILE = {
    "erase": "a\x1b[1A\x1b[2Kb.mp4",  # erases the row above
    "clear": "c\x1b[2J.mp4",  # clears the screen
    "title": "t\x1b]0;PWNED\x07.mp4",  # sets the terminal's title
    "rlo": "evil\u202e4pm.exe.mp4",  # a right-to-left override spoofs the name
    "newline": "new\nline.mp4",  # splits a one-line error
    "zero-width": "zero\u200bwidth.mp4",
}


def raw_controls(text: str) -> list[str]:
    """Characters a terminal would act on rather than show (newlines ending lines excepted)."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


@pytest.fixture
def hostile_folder(media_dir, tmp_path):
    d = tmp_path / "hostile"
    d.mkdir()
    for name in HOSTILE.values():
        os.link(media_dir / "astronaut.mp4", d / name)
        (d / ("broken-" + name)).write_bytes(b"\x00" * 64)  # an error line that names the file
    return d


def test_names_reach_stderr_escaped_one_line_per_error(hostile_folder, tiny_ckpt, tmp_path):
    out = tmp_path / "r.jsonl"
    r = cli(hostile_folder, "--weights", tiny_ckpt, "--output", out, *FAST)
    assert r.returncode in (1, 2)
    assert not raw_controls(r.stderr), [c for c in raw_controls(r.stderr)]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("deepscan: ")]
    assert len(errors) == len(HOSTILE), r.stderr  # one line per broken input, whatever its name
    assert any("\\x1b]0;PWNED\\x07" in ln for ln in errors) and any("\\u202e" in ln for ln in errors)
    assert any("new\\nline" in ln for ln in errors)
    assert not raw_controls(r.stdout.replace("\x1b[", ""))  # the table (rich's own styles aside)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {Path(rec["path"]).name for rec in records} == set(os.listdir(hostile_folder))  # JSON: the real names


def test_the_table_on_a_terminal_shows_every_row_and_no_control_sequence(hostile_folder, tiny_ckpt):
    main, sub = pty.openpty()
    env = {**os.environ, "COLUMNS": "400", "LINES": "100"}
    proc = subprocess.Popen([sys.executable, "-m", "deepscan", "scan", str(hostile_folder), "--weights",
                             str(tiny_ckpt), *FAST], stdout=sub, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env)
    os.close(sub)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=300)
    os.close(main)
    text = out.decode("utf-8", "replace")
    for seq in ("\x1b[1A", "\x1b[2K", "\x1b[2J", "\x1b]0;", "\u202e", "\u200b", "\x07"):
        assert seq not in text, repr(seq)
    plain = text.replace("\r", "")
    assert "\\x1b[2J" in plain and "\\x1b]0;PWNED\\x07" in plain and "\\u202e" in plain
    rows = [ln for ln in plain.splitlines() if ".mp4" in ln]
    assert len(rows) == 2 * len(HOSTILE), plain  # one record, one row
    assert proc.returncode in (1, 2)


# ---------------------------------------------------------------------------- outputs
def test_output_never_truncates_a_file_that_is_not_its_own(media_dir, tiny_ckpt, tmp_path):
    video = tmp_path / "v.mp4"
    shutil.copy(media_dir / "astronaut.mp4", video)
    before = video.read_bytes()
    r = cli(video, "--weights", tiny_ckpt, "--output", video, *FAST)
    one_line_error(r, "--output")
    assert r.returncode == 2 and video.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nlast line without newline")
    r = cli(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--output", notes, *FAST)
    one_line_error(r, "--output", "does not hold deepscan records")
    assert r.returncode == 2 and notes.read_text() == "my notes\nlast line without newline"


def test_output_to_standard_output_and_pipes_is_a_stream(media_dir, tiny_ckpt, tmp_path):
    video = media_dir / "astronaut.mp4"
    r = run(video, "--weights", tiny_ckpt, "--output", "/dev/stdout", *FAST)  # stdout is a pipe here
    assert r.returncode in (0, 1), r.stderr
    assert "Illegal seek" not in r.stderr and "Traceback" not in r.stderr
    assert any(line.startswith('{"schema": "deepscan.scan/1"') for line in r.stdout.splitlines())
    log = tmp_path / "log.txt"
    log.write_text("earlier\nlines\n")
    with open(log, "a") as f:  # `--output /dev/stdout >> log`: appended, nothing truncated
        r = subprocess.run([sys.executable, "-m", "deepscan", str(video), "--weights", str(tiny_ckpt), "--output",
                            "/dev/stdout", "--json", *FAST], stdout=f, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr
    lines = log.read_text().splitlines()
    assert lines[:2] == ["earlier", "lines"] and len(lines) == 4  # --json and --output both wrote it
    rfd, wfd = os.pipe()  # `--output >(gzip > r.gz)`
    proc = subprocess.Popen([sys.executable, "-m", "deepscan", str(video), "--weights", str(tiny_ckpt), "--output",
                             f"/dev/fd/{wfd}", *FAST], pass_fds=(wfd,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        got = pipe.read()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 1), err
    assert json.loads(got)["path"] == str(video)


def test_a_fifo_that_nobody_reads_is_refused_at_once(media_dir, tiny_ckpt, tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    t = time.monotonic()
    r = run(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--output", fifo, *FAST)
    assert time.monotonic() - t < 120
    one_line_error(r, "no process reads")
    assert r.returncode == 2


# ---------------------------------------------------------------------------- resume
def test_resume_rescans_records_made_with_other_settings(media_dir, tiny_ckpt, tmp_path):
    video = tmp_path / "a.mp4"
    shutil.copy(media_dir / "astronaut.mp4", video)
    out = tmp_path / "r.jsonl"
    assert cli(video, "--weights", tiny_ckpt, "--output", out, *FAST).returncode in (0, 1)
    same = cli(video, "--weights", tiny_ckpt, "--output", out, "--resume", "--json", *FAST)
    assert same.stdout == ""  # same settings: done
    other = cli(video, "--weights", tiny_ckpt, "--output", out, "--resume", "--json", "--threshold", "0.9", *FAST)
    assert "other settings" in other.stderr
    assert [json.loads(line)["threshold"] for line in other.stdout.splitlines()] == [0.9]
    copy = tmp_path / "b.mp4"
    shutil.copy(video, copy)  # the same bytes under another name: its own record
    r = cli(tmp_path, "--weights", tiny_ckpt, "--output", out, "--resume", "--json", "--threshold", "0.9", *FAST)
    assert [json.loads(line)["path"] for line in r.stdout.splitlines()] == [str(copy)]


# ---------------------------------------------------------------------------- costs
def test_a_huge_file_that_is_no_video_is_not_hashed(tmp_path, tiny_ckpt):
    sparse = tmp_path / "huge.mp4"
    with open(sparse, "wb") as f:
        f.truncate(8 << 30)  # 8 GB of holes: hashing it would read them all
    link = tmp_path / "link.mp4"
    link.symlink_to(sparse)
    r = cli(link, "--weights", tiny_ckpt, "--json", *FAST)
    rec = json.loads(r.stdout)
    assert rec["verdict"] == "error" and rec["sha256"] is None


def test_workers_are_capped_by_the_inputs(media_dir, tiny_ckpt):
    from deepscan.scan.run import ScanRequest, run_scan
    from deepscan.scan import ScanSettings

    req = ScanRequest(paths=(str(media_dir / "astronaut.mp4"),), settings=ScanSettings(clips=2, batch_size=2),
                      weights=tiny_ckpt, workers=64, detector="dlib", json_out=True)
    outcome = run_scan(req, say=lambda m: None)
    assert outcome.workers == 1 and sum(outcome.sink.verdicts.values()) == 1


def test_the_untrained_warning_is_printed_once(media_dir, tiny_ckpt):
    r = cli(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, *FAST)
    assert r.stderr.count("UNTRAINED checkpoint") == 1, r.stderr


@pytest.mark.parametrize("what,words", [("folder", "is a folder"), ("fifo", "not a regular file"),
                                        ("/dev/zero", "not a regular file")])
def test_weights_that_are_not_files_say_what_they_are(media_dir, tmp_path, what, words):
    if what == "folder":
        path = tmp_path
    elif what == "fifo":
        path = tmp_path / "w.fifo"
        os.mkfifo(path)
    else:
        path = Path(what)
    r = cli(media_dir / "astronaut.mp4", "--weights", path, *FAST)
    one_line_error(r, "--weights", words)
    assert r.returncode == 2


@pytest.mark.timeout(120)
def test_an_unreachable_ray_address_fails_in_bounded_time(media_dir, tiny_ckpt):
    t = time.monotonic()
    r = run(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--ray", "127.0.0.1:1", *FAST)
    assert time.monotonic() - t < 90
    one_line_error(r, "--ray 127.0.0.1:1")
    assert r.returncode == 2


# ---------------------------------------------------------------------------- training data
def test_cache_entries_never_merge_and_stay_short():
    from deepscan.prepare import entry_name

    a, b = entry_name("real/a b.mp4"), entry_name("real/a&b.mp4")
    assert a != b and a.startswith("real_a_b.mp4-")
    long = entry_name("fake/" + "x" * 250 + ".mp4")
    assert len(long.encode()) < 120 and long != entry_name("fake/" + "x" * 249 + "y.mp4")
    assert entry_name("été/ü.mp4") != entry_name("___/_.mp4")


def test_a_250_byte_name_prepares(tmp_path, media_dir):
    from .test_train import TINY_ARGS, deepscan

    root = tmp_path / "data"
    (root / "real").mkdir(parents=True)
    (root / "fake").mkdir()
    shutil.copy(media_dir / "astronaut.mp4", root / "real" / ("r" * 246 + ".mp4"))  # 250 bytes
    shutil.copy(media_dir / "astronaut.mp4", root / "real" / "a b.mp4")
    shutil.copy(media_dir / "carphone.mp4", root / "real" / "a&b.mp4")  # another video, a colliding old key
    shutil.copy(media_dir / "two_faces.mp4", root / "fake" / "f.mp4")
    r = deepscan("prepare", "--data", root, *[a for a in TINY_ARGS if a not in ("--vit-init", "random")][:8])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "prepared 4 video(s)" in r.stderr, r.stderr


@pytest.mark.parametrize("content,words", [(b"garbage{", "not valid JSON"), (b'{"a": 1}', "unexpected content"),
                                           (b'[["000", "001", "002"]]', "unexpected content")])
def test_bad_ffpp_split_files_are_one_line(tmp_path, content, words):
    (tmp_path / "original_sequences").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.json").write_bytes(content)
    r = cli("prepare", "--data", tmp_path)
    one_line_error(r, "train.json", words)
    assert r.returncode == 2


def test_a_non_utf8_celebdf_listing_is_one_line(tmp_path):
    (tmp_path / "Celeb-synthesis").mkdir()
    (tmp_path / "List_of_testing_videos.txt").write_bytes(b"1 Celeb-real/id0\xff.mp4\n")
    r = cli("prepare", "--data", tmp_path)
    one_line_error(r, "List_of_testing_videos.txt", "UTF-8")
    assert r.returncode == 2


def test_damaged_caches_are_one_line(tmp_path, media_dir):
    from deepscan.data import load_dataset
    from deepscan.prepare import PrepareSettings, begin, entry_name, load_cache

    from deepscan.errors import ConfigError

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache.json").write_text("{garbage")
    with pytest.raises(ConfigError, match="cache.json: damaged"):
        begin(cache, PrepareSettings())
    root = tmp_path / "data"
    (root / "real").mkdir(parents=True)
    shutil.copy(media_dir / "astronaut.mp4", root / "real" / "a.mp4")
    _, items = load_dataset(root)
    entry = cache / entry_name(items[0].key)
    entry.mkdir()
    (entry / "meta.json").write_text('{"clips": 3, "lab')  # truncated
    with pytest.raises(ConfigError, match="meta.json: damaged"):
        load_cache(cache, items)


def test_eval_with_nothing_usable_is_exit_2(tmp_path, media_dir, tiny_ckpt):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for label in ("real", "fake"):
            (root / split / label).mkdir(parents=True)
            shutil.copy(media_dir / "no_face.mp4", root / split / label / "n.mp4")
    r = cli("eval", "--data", root, "--weights", tiny_ckpt, "--detector", "dlib", "--clips", "2")
    one_line_error(r, "nothing to evaluate")
    assert r.returncode == 2


def test_a_checkpoint_without_preprocessing_is_refused_in_one_line(tmp_path, tiny_ckpt):
    from .test_hostile import rewrite

    bad = tmp_path / "bad.safetensors"
    rewrite(tiny_ckpt, bad, meta=lambda m: {**m, "preprocessing": {}})
    (tmp_path / "data" / "test" / "real").mkdir(parents=True)
    r = cli("eval", "--data", tmp_path / "data", "--weights", bad)
    one_line_error(r, "preprocessing")
    assert r.returncode == 2


@pytest.mark.parametrize("args,words", [
    (["train", "--batch-size", "0"], "--batch-size"), (["train", "--lr-step", "0"], "--lr-step"),
    (["train", "--momentum", "-1"], "--momentum"), (["train", "--lr", "nan"], "--lr"),
    (["train", "--epochs", "0"], "--epochs"), (["bench", "--batch-size", "-1"], "--batch-size"),
    (["bench", "--workers", "-3"], "--workers"), (["scan", "x.mp4", "--shard", ""], "--shard"),
    (["scan", "x.mp4", "--timeout", "nan"], "--timeout"), (["scan", "x.mp4", "--min-face", "0"], "--min-face"),
])
def test_impossible_arguments_are_refused(tmp_path, args, words):
    if args[0] == "train":
        args = [*args, "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    r = cli(*args)
    one_line_error(r, words)
    assert r.returncode == 2
    if args[0] == "train":
        assert not (tmp_path / "run").exists()  # refused before anything was made


def test_two_quick_ctrl_c_exit_130_without_a_traceback(media_dir, tiny_ckpt, tmp_path):
    import signal

    d = tmp_path / "many"
    d.mkdir()
    for i in range(6):
        os.link(media_dir / "astronaut.mp4", d / f"v{i}.mp4")
    proc = subprocess.Popen([sys.executable, "-m", "deepscan", str(d), "--weights", str(tiny_ckpt), "--json", *FAST],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "terminate called" not in err, err


def test_a_low_address_space_limit_is_one_line(media_dir, tiny_ckpt):
    r = subprocess.run(["bash", "-c", f"ulimit -v 3000000; exec {sys.executable} -m deepscan {media_dir / 'astronaut.mp4'}"
                        f" --weights {tiny_ckpt}"], capture_output=True, text=True, timeout=120)
    one_line_error(r, "ulimit -v")
    assert r.returncode == 2 and "bad_alloc" not in r.stderr


def _limited(limit_kb: int, *args) -> subprocess.CompletedProcess:
    return under_file_size_limit(limit_kb, "-m", "deepscan", *args)


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    r = _limited(2048, "weights", "init", "--variant", "spatial", "--image-size", "62", "--out", tmp_path / "x.safetensors")
    one_line_error(r, "x.safetensors", "cannot write the checkpoint", "File too large")
    assert r.returncode == 2 and list(tmp_path.iterdir()) == []  # no half-written temporary file


def test_shared_memory_refused_by_a_file_size_limit_is_one_line(media_dir, tiny_ckpt):
    r = _limited(20, media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--workers", "1")
    one_line_error(r, "shared memory", "ulimit -f")
    assert r.returncode == 2


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_face_clip_cache_that_cannot_be_written_is_one_line_and_leaves_nothing_half_done(tmp_path, workers):
    from . import media

    data = media.make_dataset(tmp_path / "data", "folders", per_split=1)
    r = _limited(16, "prepare", "--data", data, "--cache", tmp_path / "cache", "--image-size", "62", "--lda-size",
                 "32", "--clips", "2", "--detector", "dlib", "--workers", workers)
    one_line_error(r, "cache", "cannot write the face-clip cache", "ulimit -f", "kept")
    assert r.returncode == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cache.json"]  # no temporary entries


def test_plots_that_cannot_be_written_leave_the_metrics_printed_and_no_partial_png(tmp_path, tiny_ckpt):
    from . import media

    data = media.make_dataset(tmp_path / "data", "folders", per_split=1)
    common = ["eval", "--data", data, "--cache", tmp_path / "cache", "--weights", tiny_ckpt, "--split", "val",
              "--detector", "dlib", "--clips", "2", "--json"]
    first = _limited(1 << 20, *common)  # prepares the cache
    assert first.returncode == 0, first.stderr
    r = _limited(16, *common, "--plots", tmp_path / "plots")  # a PNG is ~30 KB
    one_line_error(r, "roc_frame.png", "writing failed (File too large)")
    assert r.returncode == 2 and json.loads(r.stdout)["overall"] == json.loads(first.stdout)["overall"]
    assert list((tmp_path / "plots").iterdir()) == []


@pytest.mark.parametrize("args", [[], ["--json"]], ids=["table", "json"])
def test_standard_output_on_a_full_disk_is_one_line(media_dir, tiny_ckpt, args):
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        r = subprocess.run([sys.executable, "-m", "deepscan", media_dir / "astronaut.mp4", "--weights", tiny_ckpt,
                            *FAST, *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=180)
    one_line_error(r, "standard output", "No space left on device", "--output")
    assert r.returncode == 2


@pytest.mark.parametrize("args", [["--version"], ["scan", "--help"], ["weights", "list"]])
def test_help_version_and_lists_on_a_full_disk_are_one_line(args):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "deepscan", *args], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=120)
    one_line_error(r, "standard output", "No space left on device")
    assert r.returncode == 2


# ---------------------------------------------------------------------------- frames that lie
def _ff(*args):
    from deepscan.video import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *map(str, args)], check=True)


@pytest.fixture(scope="module")
def lying(tmp_path_factory, media_dir):
    d = tmp_path_factory.mktemp("lying")
    src = "testsrc=size=320x240:rate=25"
    _ff("-f", "lavfi", "-i", src, "-t", 2, "-c:v", "libx264", "-pix_fmt", "yuv420p", d / "a.ts")
    _ff("-f", "lavfi", "-i", "testsrc=size=640x360:rate=25", "-t", 2, "-c:v", "libx264", "-pix_fmt", "yuv420p", d / "b.ts")
    (d / "reschange.ts").write_bytes((d / "a.ts").read_bytes() + (d / "b.ts").read_bytes())
    _ff("-f", "lavfi", "-i", src, "-t", 4, "-c:v", "libx264", "-pix_fmt", "yuv420p", d / "full.mp4")
    _ff("-ss", "0.12", "-i", d / "full.mp4", "-c", "copy", d / "editlist.mp4")  # an edit list hides 3 frames
    _ff("-f", "lavfi", "-i", "testsrc=size=320x240:rate=1000", "-t", "0.2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
        d / "fps1000.mp4")
    _ff("-f", "lavfi", "-i", "testsrc=size=320x240:rate=30", "-frames:v", 72, "-vf", "setpts=N*100/TB", "-fps_mode",
        "passthrough", "-c:v", "libx264", "-pix_fmt", "yuv420p", d / "sparse.mkv")  # 1 frame per 100 s, "30 fps"
    from . import media

    media.truncated(media.face_video(d / "long.mp4", frames=250, faststart=True), d / "half.mp4", keep=0.5)
    _ff("-f", "lavfi", "-i", src, "-frames:v", 0, "-c:v", "libx264", d / "nothing.mp4")
    return d


def scan_record(path, tiny_ckpt, *extra):
    r = cli(path, "--weights", tiny_ckpt, "--json", "--clips", "8", "--detector", "dlib", "--batch-size", "2", *extra)
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def test_a_picture_size_change_keeps_frame_numbers_and_warns(lying):
    from deepscan.video import DecodeReport, ffmpeg_exe, probe, read_clips

    info = probe(lying / "reschange.ts")
    report = DecodeReport()
    select = {c.frame_indices[0]: c.frames[0] for c in read_clips(info, [10, 60, 90], 3, "select", report)}
    # every frame in order, by a plain pass (no frame selection, ffmpeg's defaults)
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(lying / "reschange.ts"), "-vf", "scale=320:240",
                          "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    every = np.frombuffer(raw, np.uint8).reshape(-1, 240, 320, 3)
    assert len(every) == 100 and select.keys() == {10, 60, 90}
    for k, frame in select.items():  # frame k is frame k: the counter did not restart at the change
        diffs = [np.abs(frame.astype(int) - every[j].astype(int)).mean() for j in range(len(every))]
        assert int(np.argmin(diffs)) == k, (k, int(np.argmin(diffs)))
    assert any("picture size changes mid-stream" in w for w in report.warnings), report.warnings


def test_a_file_cut_in_half_warns(lying, tiny_ckpt):
    rec = scan_record(lying / "half.mp4", tiny_ckpt)
    assert rec["verdict"] in ("fake", "real") and any("truncated" in w for w in rec["warnings"]), rec


@pytest.mark.parametrize("name", ["editlist.mp4", "fps1000.mp4", "sparse.mkv"])
def test_intact_files_get_every_clip_and_no_truncation_warning(lying, tiny_ckpt, name):
    rec = scan_record(lying / name, tiny_ckpt)
    assert not any("truncated" in w or "decoded" in w for w in rec["warnings"]), rec["warnings"]
    assert rec["sampling"]["decoded_clips"] == rec["sampling"]["clips"] == 8, rec["sampling"]
    if name == "fps1000.mp4":
        assert rec["video"]["fps"] == 1000 and rec["video"]["frames"] == 200
    if name == "sparse.mkv":
        assert rec["video"]["frames"] == 72 and any("variable frame rate" in w for w in rec["warnings"])
    if name == "editlist.mp4":
        assert rec["video"]["frames"] == 97


def test_ffmpeg_messages_never_read_last_message_repeated():
    from deepscan.video import _first_error_line

    err = "[h264 @ 0x1] Invalid NAL unit size (1 > 0).\n    Last message repeated 1 times\n"
    assert _first_error_line(err) == "Invalid NAL unit size (1 > 0)."


def test_a_recording_without_streams_says_so(lying, tiny_ckpt):
    rec = scan_record(lying / "nothing.mp4", tiny_ckpt)
    assert rec["verdict"] == "error" and "no stream at all" in rec["error"]
