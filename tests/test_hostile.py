"""Hostile inputs, names and places: one line, the documented exit code, no traceback, the
other results kept."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from deepscan.cli import app

FAST = ["--clips", "2", "--detector", "dlib", "--batch-size", "2"]
invoke = CliRunner().invoke


def run(*args, **kw):
    """The real console entry point, in a subprocess (for what only a process shows: locales,
    closed pipes, standard input)."""
    return subprocess.run([sys.executable, "-m", "deepscan", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kw)


def cli(*args, env=None):
    """The command line in this process (no interpreter and torch start-up per call), routed as
    ``deepscan.cli.main`` routes it; any exception other than the exit fails the test."""
    from deepscan.cli import COMMANDS

    argv = [str(a) for a in args]
    if argv[0] not in COMMANDS:
        argv.insert(0, "scan")
    r = invoke(app, argv, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


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
    r = cli(d / "clip [1080p].mp4", d / "x[/raw].mp4", d / "mix [/] final.mp4", "--weights", tiny_ckpt, *FAST,
            env={"COLUMNS": "250"})
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert "clip [1080p].mp4" in r.stdout and "x[/raw].mp4" in r.stdout and "mix [/] final.mp4" in r.stdout
    assert "mix [/] final.mp4: no such file" in r.stderr


def test_a_checkpoint_name_with_brackets_is_printed_as_is(tiny_ckpt, media_dir, tmp_path):
    ckpt = tmp_path / "model [v2].safetensors"
    shutil.copy(tiny_ckpt, ckpt)
    r = cli(media_dir / "astronaut.mp4", "--weights", ckpt, *FAST, "--json")
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
    r = cli(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--heatmaps", target, *FAST)
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

    save, saved = Image.Image.save, []

    def full(self, fp, *a, **k):  # the disk fills after a video's first PNG
        if not saved or Path(fp).parent != saved[-1]:
            saved.append(Path(fp).parent)
            return save(self, fp, *a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    r = invoke(app, ["scan", str(media_dir / "astronaut.mp4"), str(media_dir / "carphone.mp4"), "--weights",
                     str(tiny_ckpt), "--heatmaps", str(tmp_path / "heat"), "--json", *FAST])
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code in (0, 1) and len(recs) == 2
    for rec in recs:
        assert rec["verdict"] in ("fake", "real") and rec["heatmaps"] is None
        assert rec["warnings"] == ["heatmaps not written (No space left on device)"]
    assert len(saved) == 2 and not list((tmp_path / "heat").rglob("*.png"))  # no half-written set left


def test_a_link_out_of_the_heatmap_folder_is_refused_with_a_warning(media_dir, tiny_ckpt, tmp_path):
    from deepscan.heatmaps import safe_folder_name

    heat, outside = tmp_path / "heat", tmp_path / "outside"
    heat.mkdir()
    outside.mkdir()
    video = media_dir / "astronaut.mp4"
    (heat / safe_folder_name(str(video))).symlink_to(outside)
    r = cli(video, media_dir / "carphone.mp4", "--weights", tiny_ckpt, "--heatmaps", heat, "--json", *FAST)
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr
    assert "heatmaps not written" in recs[0]["warnings"][0] and "link" in recs[0]["warnings"][0]
    assert recs[1]["heatmaps"] and not list(outside.iterdir())


# ---------------------------------------------------------------------------- output
def test_a_full_disk_for_output_ends_the_run_cleanly(media_dir, tiny_ckpt):
    r = cli(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--output", "/dev/full", *FAST)
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
    r = cli(media_dir, "--weights", tiny_ckpt, "--glob", "", *FAST)
    assert r.returncode == 2
    one_line_error(r, "--glob")


@pytest.mark.parametrize("option", ["--scores", "--plots"])
def test_eval_outputs_in_impossible_places_are_misuse(tmp_path, tiny_ckpt, option):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "x" if option == "--plots" else tmp_path
    r = invoke(app, ["eval", "--data", str(tmp_path), "--weights", str(tiny_ckpt), option, str(target)])
    assert r.exit_code == 2 and option in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- media that gave wrong answers
from . import media  # noqa: E402


def scan_json(*args, **kw):
    r = cli(*args, "--json", **kw)
    assert "Traceback" not in r.stderr, r.stderr
    return r, [json.loads(line) for line in r.stdout.splitlines()]


def test_two_video_streams_scan_the_one_probed(media_dir, tiny_ckpt, tmp_path):
    path = media.two_streams(media_dir / "astronaut.mp4", tmp_path / "two.mp4")
    r, (rec,) = scan_json(path, "--weights", tiny_ckpt, *FAST)
    assert rec["verdict"] in ("fake", "real"), rec
    assert rec["video"]["stream"] == 1 and rec["video"]["width"] == 1280


def test_a_recording_without_duration_is_scanned_whole(media_dir, tiny_ckpt, tmp_path):
    path = media.piped_webm(media_dir / "astronaut.mp4", tmp_path / "rec.webm")
    r, (rec,) = scan_json(path, "--weights", tiny_ckpt, "--clips", "8", "--detector", "dlib")
    assert rec["sampling"]["clips"] == 8 and rec["sampling"]["decoded_clips"] == 8 and rec["warnings"] == []


def test_non_square_pixels_give_boxes_in_displayed_pixels(media_dir, tiny_ckpt, tmp_path):
    path = media.non_square_pixels(media_dir / "astronaut.mp4", tmp_path / "sar.mp4")
    r, (rec,) = scan_json(path, "--weights", tiny_ckpt, *FAST)
    assert rec["video"]["width"] == 640 and rec["video"]["height"] == 360 and rec["video"]["sar"] == 1.4222
    box = rec["tracks"][0]["frames"][0]["box"]
    assert 0.8 < (box[2] - box[0]) / (box[3] - box[1]) < 1.25  # a face of the right shape ...
    _, (ref,) = scan_json(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, *FAST)
    assert max(abs(a - b) for a, b in zip(box, ref["tracks"][0]["frames"][0]["box"])) < 15  # ... where it is seen


def test_a_group_of_small_faces_is_found(tmp_path, tiny_ckpt):
    path = media.small_faces_grid(tmp_path / "grid.mp4", face_px=67)
    r, (rec,) = scan_json(path, "--weights", tiny_ckpt, "--clips", "1", "--detector", "dlib")
    assert rec["verdict"] in ("fake", "real") and len(rec["tracks"]) >= 7


def test_a_protocol_like_name_is_that_file_and_dash_does_not_read_stdin(media_dir, tiny_ckpt, tmp_path):
    from deepscan.hashing import sha256_file

    shutil.copy(media_dir / "carphone.mp4", tmp_path / "normal.mp4")
    shutil.copy(media_dir / "astronaut.mp4", tmp_path / "concat:normal.mp4")
    shutil.copy(media_dir / "astronaut.mp4", tmp_path / "-")
    p = subprocess.Popen([sys.executable, "-m", "deepscan", "concat:normal.mp4", "-", "--weights", str(tiny_ckpt),
                          "--json", *FAST], cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # stdin stays open: nothing may wait on it
    out, err = p.communicate(timeout=180)
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in recs] == ["concat:normal.mp4", "-"] and "Traceback" not in err
    for rec in recs:
        assert rec["video"]["width"] == 640 and rec["verdict"] in ("fake", "real")  # the astronaut, not carphone
        assert rec["sha256"] == sha256_file(tmp_path / rec["path"])


def test_non_utf8_file_names_give_valid_utf8_output(media_dir, tiny_ckpt, tmp_path):
    name = os.fsdecode(b"caf\xe9 [x].mp4")
    shutil.copy(media_dir / "astronaut.mp4", tmp_path / name)
    r = cli(tmp_path, "--weights", tiny_ckpt, "--json", *FAST)
    assert r.returncode in (0, 1)
    (rec,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert rec["path"].endswith("caf\\xe9 [x].mp4") and rec["verdict"] in ("fake", "real")
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "COLUMNS": "200"}  # where printing crashed
    table = subprocess.run([sys.executable, "-m", "deepscan", str(tmp_path), "--weights", str(tiny_ckpt), *FAST],
                           capture_output=True, env=env, timeout=300)
    assert table.returncode in (0, 1) and b"Traceback" not in table.stderr
    assert "caf\\xe9 [x].mp4" in table.stdout.decode("utf-8")


# ---------------------------------------------------------------------------- hostile checkpoints
def rewrite(src, dst, meta=None, tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        old_meta = json.loads(f.metadata()["deepscan"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    raw = meta(old_meta) if callable(meta) else old_meta
    state = tensors(state) if tensors else state
    save_file(state, str(dst), metadata={"deepscan": raw if isinstance(raw, str) else json.dumps(raw)})
    return dst


def nan_weights(state):
    k = "model.backbone.fc.weight"
    state[k] = state[k].clone()
    state[k][0, 0] = float("nan")
    return state


def set_config(**kw):
    return lambda m: {**m, "config": {**m["config"], **kw}}


@pytest.mark.parametrize("case,words", [
    (dict(tensors=nan_weights), "NaN or infinite"),
    (dict(meta=set_config(std=[0, 0, 0])), "std must be > 0"),
    (dict(meta=set_config(num_classes=1000000)), "num_classes must be between"),
    (dict(meta=set_config(num_frames=100000)), "num_frames must be between"),
    (dict(meta=set_config(embed_dim=10**9)), "embed_dim must be between"),
    (dict(meta=set_config(mean="abc")), "mean must be 3 finite numbers"),
    (dict(meta=set_config(mean=[0.5, 0.5])), "mean must be 3 finite numbers"),
    (dict(meta=lambda m: "[1, 2, 3]"), "not an object"),
    (dict(meta=set_config(latent_dim=6)), "has shape"),  # the header's tensors do not fit the config
])
def test_hostile_checkpoints_are_refused_in_one_line(media_dir, tiny_ckpt, tmp_path, case, words):
    bad = rewrite(tiny_ckpt, tmp_path / "bad.safetensors", **case)
    r = cli(media_dir / "astronaut.mp4", "--weights", bad, *FAST, "--json")
    assert r.returncode == 2 and r.stdout == ""
    one_line_error(r, "bad.safetensors", words)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load(media_dir, tiny_ckpt, tmp_path, dtype):
    import torch

    half = rewrite(tiny_ckpt, tmp_path / "half.safetensors",
                   tensors=lambda s: {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
                                      for k, v in s.items()})
    r, (rec,) = scan_json(media_dir / "astronaut.mp4", "--weights", half, *FAST)
    assert rec["verdict"] in ("fake", "real") and 0 <= rec["score"] <= 1


def test_an_explicit_variant_must_match_the_checkpoint(media_dir, tiny_ckpt):
    r = cli(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--variant", "temporal", *FAST)
    assert r.returncode == 2
    one_line_error(r, "--variant temporal", "spatial-temporal model")


# ---------------------------------------------------------------------------- manifests and weights init
@pytest.mark.parametrize("field,value,words", [
    ("filename", "../../etc/passwd", "'filename'"),
    ("filename", "/abs/model.onnx", "'filename'"),
    ("repo_id", "../../etc", "'repo_id'"),
    ("size", True, "'size'"),
])
def test_hostile_manifest_entries_name_entry_and_field(tmp_path, field, value, words):
    from deepscan import weights

    from .test_weights import entry_dict

    entry = {**entry_dict(), field: value}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema": 1, "entries": [entry]}))
    r = cli("weights", "list", env={"DEEPSCAN_MANIFEST": str(path)})
    assert r.returncode == 2
    one_line_error(r, "entry 0 ('test-det')", words)
    with pytest.raises(weights.WeightsError):
        weights.load_manifest(path)


@pytest.mark.parametrize("content,words", [
    ('{"schema": 1, "entries": []}'.encode("utf-16"), "not UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_unreadable_manifests_are_one_line(tmp_path, content, words):
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    r = cli("weights", "list", env={"DEEPSCAN_MANIFEST": str(path)})
    assert r.returncode == 2
    one_line_error(r, words)


@pytest.mark.parametrize("where,words", [("dir", "is a folder"), ("under_file", "part of the path is a file"),
                                         ("pt", "a .safetensors file")])
def test_weights_init_out_in_impossible_places(tmp_path, where, words):
    (tmp_path / "afile").write_text("x")
    out = {"dir": tmp_path, "under_file": tmp_path / "afile" / "w.safetensors", "pt": tmp_path / "w.pt"}[where]
    r = invoke(app, ["weights", "init", "--out", str(out)])
    assert r.exit_code == 2 and words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w.pt").exists()


# ---------------------------------------------------------------------------- folders and names
def test_camera_files_are_scanned_and_mac_sidecars_skipped(media_dir, tiny_ckpt, tmp_path):
    d = tmp_path / "card"
    d.mkdir()
    media.ffmpeg("-i", media_dir / "astronaut.mp4", "-c", "copy", "-f", "mpegts", d / "00001.MTS")
    (d / "._00001.MTS").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    r, recs = scan_json(d, "--weights", tiny_ckpt, *FAST)
    assert [Path(x["path"]).name for x in recs] == ["00001.MTS"] and recs[0]["verdict"] in ("fake", "real")
    assert r.returncode in (0, 1)


def test_a_folder_named_like_a_command_gets_a_hint(tmp_path, monkeypatch, capsys):
    from deepscan.cli import main

    (tmp_path / "train").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    assert exit_.value.code == 2 and "deepscan scan train" in capsys.readouterr().err


def test_stale_heatmaps_are_replaced(media_dir, tiny_ckpt, tmp_path):
    from deepscan.heatmaps import safe_folder_name

    heat = tmp_path / "heat"
    video = media_dir / "astronaut.mp4"
    stale = heat / safe_folder_name(str(video)) / "rank09_frame999999.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    r, (rec,) = scan_json(video, "--weights", tiny_ckpt, "--heatmaps", heat, *FAST)
    assert rec["heatmaps"] == str(stale.parent) and not stale.exists()
    names = {p.name for p in stale.parent.iterdir()}
    # the sheet, the timeline and this run's two face clips
    assert {"contact_sheet.png", "timeline.png"} <= names and len(names) == 4


def test_manifest_strings_with_brackets_are_printed_as_text(tmp_path):
    from .test_weights import entry_dict

    path = tmp_path / "my [manifest].json"
    path.write_text(json.dumps({"schema": 1, "entries": [{**entry_dict(), "license": "[/] research [bold]"}]}))
    r = cli("weights", "list", env={"DEEPSCAN_MANIFEST": str(path), "COLUMNS": "200"})
    text = " ".join(r.stdout.split())  # rich wraps a table's title to the table's width
    assert r.returncode == 0 and "[/] research [bold]" in text and "my [manifest].json" in text


def test_train_out_on_a_file_is_misuse(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = cli("train", "--data", tmp_path, "--out", tmp_path / "afile")
    assert r.returncode == 2 and "--out" in r.stderr and "not a folder" in r.stderr
