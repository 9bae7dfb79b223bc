"""Hostile inputs, names and places: one line, the documented exit code, no traceback, the
other results kept."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepscan.cli import app

FAST = ["--clips", "2", "--detector", "dlib", "--batch-size", "2"]
invoke = CliRunner().invoke


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "deepscan", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kw)


def one_line_error(r, *words):
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("deepscan: error:")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], errors[0]


# ---------------------------------------------------------------------------- names
def test_square_brackets_in_names_are_text_not_markup(media_dir, tiny_ckpt, tmp_path):
    d = tmp_path / "names"
    d.mkdir()
    shutil.copy(media_dir / "astronaut.mp4", d / "clip [1080p].mp4")
    (d / "x[").mkdir()
    shutil.copy(media_dir / "astronaut.mp4", d / "x[/raw].mp4")  # folder "x[", file "raw].mp4"
    r = run(d / "clip [1080p].mp4", d / "x[/raw].mp4", d / "mix [/] final.mp4", "--weights", tiny_ckpt, *FAST,
            env={**os.environ, "COLUMNS": "250"})
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert "clip [1080p].mp4" in r.stdout and "x[/raw].mp4" in r.stdout and "mix [/] final.mp4" in r.stdout
    assert "mix [/] final.mp4: no such file" in r.stderr


def test_a_checkpoint_name_with_brackets_is_printed_as_is(tiny_ckpt, media_dir, tmp_path):
    ckpt = tmp_path / "model [v2].safetensors"
    shutil.copy(tiny_ckpt, ckpt)
    r = run(media_dir / "astronaut.mp4", "--weights", ckpt, *FAST, "--json")
    assert r.returncode in (0, 1) and "model [v2].safetensors is an UNTRAINED" in r.stderr, r.stderr


# ---------------------------------------------------------------------------- --heatmaps places
@pytest.mark.parametrize("where,words", [
    ("file", "exists and is not a folder"),
    ("under_file", "is a file, not a folder"),
    ("proc", "cannot create it"),
])
def test_impossible_heatmap_folders_are_misuse_before_scanning(media_dir, tiny_ckpt, tmp_path, where, words):
    (tmp_path / "afile").write_text("x")
    target = {"file": tmp_path / "afile", "under_file": tmp_path / "afile" / "heat", "proc": Path("/proc/x/heat")}[where]
    r = run(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--heatmaps", target, *FAST)
    assert r.returncode == 2 and r.stdout == ""
    one_line_error(r, "--heatmaps", words)


def test_read_only_heatmap_folder_is_misuse(media_dir, tiny_ckpt, tmp_path, monkeypatch):
    def erofs(self, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", erofs)
    r = invoke(app, ["scan", str(media_dir / "astronaut.mp4"), "--weights", str(tiny_ckpt),
                     "--heatmaps", str(tmp_path / "heat"), *FAST])
    assert r.exit_code == 2 and "Read-only file system" in r.stderr and r.stdout == ""


def test_a_full_disk_while_writing_heatmaps_is_a_warning_and_the_scan_goes_on(media_dir, tiny_ckpt, tmp_path,
                                                                                monkeypatch):
    from PIL import Image

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    r = invoke(app, ["scan", str(media_dir / "astronaut.mp4"), str(media_dir / "carphone.mp4"), "--weights",
                     str(tiny_ckpt), "--heatmaps", str(tmp_path / "heat"), "--json", *FAST])
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code in (0, 1) and len(recs) == 2
    for rec in recs:
        assert rec["verdict"] in ("fake", "real") and rec["heatmaps"] is None
        assert rec["warnings"] == ["heatmaps not written (No space left on device)"]


def test_a_link_out_of_the_heatmap_folder_is_refused_with_a_warning(media_dir, tiny_ckpt, tmp_path):
    from deepscan.heatmaps import safe_folder_name

    heat, outside = tmp_path / "heat", tmp_path / "outside"
    heat.mkdir()
    outside.mkdir()
    video = media_dir / "astronaut.mp4"
    (heat / safe_folder_name(str(video))).symlink_to(outside)
    r = run(video, media_dir / "carphone.mp4", "--weights", tiny_ckpt, "--heatmaps", heat, "--json", *FAST)
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr
    assert "heatmaps not written" in recs[0]["warnings"][0] and "link" in recs[0]["warnings"][0]
    assert recs[1]["heatmaps"] and not list(outside.iterdir())


# ---------------------------------------------------------------------------- output
def test_a_full_disk_for_output_ends_the_run_cleanly(media_dir, tiny_ckpt):
    r = run(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--output", "/dev/full", *FAST)
    assert r.returncode == 2
    one_line_error(r, "/dev/full", "No space left on device")


def test_stdout_on_a_full_disk_is_exit_2(media_dir, tiny_ckpt):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "deepscan", str(media_dir / "astronaut.mp4"), "--weights",
                            str(tiny_ckpt), "--json", *FAST], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "standard output" in r.stderr and "No space left on device" in r.stderr


def test_a_closed_pipe_keeps_the_exit_code_the_results_earned(media_dir, tiny_ckpt):
    videos = [media_dir / "no_face.mp4"] * 3  # no-face: exit 0 when nothing is fake or failed
    p = subprocess.Popen([sys.executable, "-m", "deepscan", *map(str, videos), "--weights", str(tiny_ckpt), "--json",
                          *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    p.stdout.close()  # like `| head -1`
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0, err
    assert json.loads(first)["verdict"] == "no-face" and "Traceback" not in err and "BrokenPipe" not in err


def test_empty_glob_is_misuse(media_dir, tiny_ckpt):
    r = run(media_dir, "--weights", tiny_ckpt, "--glob", "", *FAST)
    assert r.returncode == 2
    one_line_error(r, "--glob")


@pytest.mark.parametrize("option", ["--scores", "--plots"])
def test_eval_outputs_in_impossible_places_are_misuse(tmp_path, tiny_ckpt, option):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "x" if option == "--plots" else tmp_path
    r = invoke(app, ["eval", "--data", str(tmp_path), "--weights", str(tiny_ckpt), option, str(target)])
    assert r.exit_code == 2 and option in r.stderr and "Traceback" not in r.stderr
