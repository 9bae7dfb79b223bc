import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from deepscan.checkpoint import load_checkpoint
from deepscan.cli import app
from deepscan.completions import SHELLS, script
from deepscan.config import config_for_variant
from deepscan.model import LDADetector

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run_cli(*args, env=None):
    """The real console entry point in a subprocess."""
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "deepscan", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=300)


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_bench_json_costs():
    result = runner.invoke(app, ["bench", "--json"])
    assert result.exit_code == 0, result.output
    costs = {c["variant"]: c for c in json.loads(result.stdout)["costs"]}
    assert list(costs) == ["xception", "spatial", "temporal", "spatial-temporal"]
    assert abs(costs["xception"]["gmacs"] - 14.60) / 14.60 < 0.01
    for c in costs.values():
        assert {"variant", "params_m", "gmacs", "paper_params_m", "paper_gmacs"} <= set(c)
    assert costs["spatial-temporal"]["params_m"] > costs["temporal"]["params_m"] > costs["spatial"]["params_m"]


def test_weights_init_then_reload_reproduces_outputs(tmp_path):
    out = tmp_path / "st.safetensors"
    result = runner.invoke(app, ["weights", "init", "--variant", "spatial", "--seed", "7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, info = load_checkpoint(out)
    assert info.untrained and info.variant == "spatial"
    torch.manual_seed(7)
    fresh = LDADetector(config_for_variant("spatial")).eval()
    image, frames = torch.randn(1, 3, 398, 398), torch.randn(1, 1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(image, frames), fresh(image, frames))


def test_scan_json_schema_on_real_face_video(media_dir, tiny_ckpt):
    result = runner.invoke(app, ["scan", str(media_dir / "carphone.mp4"), "--weights", str(tiny_ckpt), "--json",
                                 "--clips", "6", "--detector", "dlib"])
    assert result.exit_code in (0, 1), result.output
    (rec,) = json_lines(result.stdout)
    assert rec["schema"] == "deepscan.scan/1"
    assert rec["verdict"] in ("fake", "real") and rec["error"] is None
    assert rec["model"]["untrained"] is True and rec["model"]["variant"] == "spatial-temporal"
    assert len(rec["model"]["sha256"]) == 64 and len(rec["sha256"]) == 64
    assert rec["detector"] == "dlib" and rec["threshold"] == 0.5 and rec["aggregation"] == "mean"
    assert rec["sampling"]["clips"] == 6 and rec["sampling"]["n"] == 3
    (track,) = rec["tracks"]
    assert len(track["frames"]) >= 5
    scores = [f["score"] for f in track["frames"]]
    assert abs(track["score"] - sum(scores) / len(scores)) < 1e-5  # mean of frames (paper)
    assert rec["score"] == track["score"]
    f0 = track["frames"][0]
    assert set(f0) == {"index", "time_s", "score", "box"} and len(f0["box"]) == 4
    assert {"decode_s", "detect_crop_s", "model_s", "total_s"} <= set(rec["timings"])
    assert (rec["verdict"] == "fake") == (rec["score"] >= 0.5)
    assert "UNTRAINED" in result.stderr


def test_exit_codes_follow_antivirus_convention(media_dir, tiny_ckpt, tmp_path):
    args = ["scan", str(media_dir / "astronaut.mp4"), "--weights", str(tiny_ckpt), "--detector", "dlib",
            "--clips", "2", "--json"]
    assert runner.invoke(app, args + ["--threshold", "0"]).exit_code == 1
    assert runner.invoke(app, args + ["--threshold", "1"]).exit_code == 0
    missing = str(tmp_path / "missing.mp4")
    assert runner.invoke(app, args + ["--threshold", "1", missing]).exit_code == 2
    assert runner.invoke(app, args + ["--threshold", "0", missing]).exit_code == 1  # 1 wins over 2
    assert runner.invoke(app, args + ["--threshold", "3"]).exit_code == 2  # misuse


@pytest.fixture
def bad_folder(media_dir, tmp_path):
    d = tmp_path / "mixed inputs ünïcode"
    d.mkdir()
    shutil.copy(media_dir / "carphone.mp4", d / "good video ä.mp4")
    (d / "empty.mp4").touch()
    (d / "random.mp4").write_bytes(random.Random(0).randbytes(5000))  # some random bytes pass for MP3 audio
    (d / "notes.mp4").write_text("just text\n")
    shutil.copy(media_dir / "no_index.mp4", d / "truncated.mp4")
    shutil.copy(media_dir / "audio.m4a", d / "audio.mp4")
    shutil.copy(media_dir / "no_face.mp4", d / "no face.mp4")
    shutil.copy(media_dir / "one_frame.mp4", d / "one_frame.mp4")
    Image.new("RGB", (64, 64)).save(d / "picture.jpg")
    (d / "dangling.mp4").symlink_to(d / "nowhere.mp4")
    (d / "loop.mp4").symlink_to(d / "loop.mp4")
    (d / "empty folder").mkdir()
    return d


def test_bad_inputs_each_get_an_error_and_the_scan_goes_on(bad_folder, tiny_ckpt, tmp_path):
    image = bad_folder / "picture.jpg"
    result = run_cli(bad_folder, image, tmp_path / "missing.mp4", bad_folder / "empty folder",
                     "--weights", tiny_ckpt, "--json", "--clips", "4", "--detector", "dlib")
    assert "Traceback" not in result.stderr
    recs = {Path(r["path"]).name: r for r in json_lines(result.stdout)}
    assert recs["good video ä.mp4"]["verdict"] in ("fake", "real")
    assert recs["no face.mp4"]["verdict"] == "no-face" and recs["no face.mp4"]["error"] is None
    expected = {
        "empty.mp4": "empty file", "random.mp4": "not a readable video", "notes.mp4": "not a readable video",
        "truncated.mp4": "not a readable video", "audio.mp4": "no video stream", "one_frame.mp4": "fewer than the 3",
        "picture.jpg": "still image", "missing.mp4": "no such file", "dangling.mp4": "broken symbolic link",
        "loop.mp4": "symbolic link loop", "empty folder": "holds no files",
    }
    for name, words in expected.items():
        rec = recs[name]
        assert rec["verdict"] == "error" and words in rec["error"], (name, rec["error"])
        assert "\n" not in rec["error"] and name in rec["error"]
    expected_code = 1 if recs["good video ä.mp4"]["verdict"] == "fake" else 2
    assert result.returncode == expected_code


def test_unreadable_file_message(media_dir, tiny_ckpt, tmp_path, monkeypatch):
    from deepscan import video

    monkeypatch.setattr(video, "_readable", lambda p: False)
    result = runner.invoke(app, ["scan", str(media_dir / "carphone.mp4"), "--weights", str(tiny_ckpt), "--json",
                                 "--workers", "0"])  # the patch lives in this process
    (rec,) = json_lines(result.stdout)
    assert result.exit_code == 2 and "permission denied" in rec["error"]


def test_heatmaps_and_table_for_real_video(media_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "heat"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(media_dir / "carphone.mp4", a / "clip.mp4")
    shutil.copy(media_dir / "astronaut.mp4", b / "clip.mp4")  # same name, other folder
    result = runner.invoke(app, ["scan", str(a / "clip.mp4"), str(b / "clip.mp4"), "--weights", str(tiny_ckpt),
                                 "--heatmaps", str(out), "--clips", "4", "--detector", "dlib"])
    assert result.exit_code in (0, 1), result.output
    assert "verdict" in result.stdout and "UNTRAINED" in result.stdout + result.stderr
    folders = sorted(p for p in out.iterdir())
    assert len(folders) == 2 and all(f.name.startswith("clip.mp4-") for f in folders)
    for f in folders:
        sheet = Image.open(f / "contact_sheet.png")
        sheet.verify()
        pngs = sorted(f.glob("rank*.png"))
        assert 1 <= len(pngs) <= 4
        img = Image.open(pngs[0])
        assert img.width == 3 * 224  # face, spatial overlay, temporal overlay


def test_boxes_are_reported_in_video_pixels_when_frames_are_scaled(media_dir, tiny_ckpt, monkeypatch):
    from deepscan import video

    args = ["scan", str(media_dir / "astronaut.mp4"), "--weights", str(tiny_ckpt), "--json", "--clips", "2",
            "--detector", "dlib", "--workers", "0"]  # the patch lives in this process
    full = json_lines(runner.invoke(app, args).stdout)[0]
    monkeypatch.setattr(video, "MAX_SIDE", 480)  # decode the 640x360 video at 480x270
    small = json_lines(runner.invoke(app, args).stdout)[0]
    a, b = full["tracks"][0]["frames"][0]["box"], small["tracks"][0]["frames"][0]["box"]
    assert small["video"]["width"] == 640 and max(abs(x - y) for x, y in zip(a, b)) < 12


def test_default_command_routes_to_scan(media_dir, tiny_ckpt):
    result = run_cli(media_dir / "astronaut.mp4", "--weights", tiny_ckpt, "--json", "--clips", "2",
                     "--detector", "dlib")
    assert result.returncode in (0, 1), result.stderr
    assert json_lines(result.stdout)[0]["path"].endswith("astronaut.mp4")


def test_full_size_untrained_scan_end_to_end(media_dir, tmp_path):
    ckpt = tmp_path / "st.safetensors"
    assert run_cli("weights", "init", "--out", ckpt).returncode == 0
    result = run_cli(media_dir / "carphone.mp4", "--weights", ckpt, "--json", "--clips", "3", "--detector", "dlib")
    (rec,) = json_lines(result.stdout)
    assert result.returncode in (0, 1) and rec["verdict"] in ("fake", "real")
    assert 0.0 <= rec["score"] <= 1.0 and rec["model"]["untrained"]


def test_no_checkpoint_says_what_to_do(tmp_path, monkeypatch):
    # the default model cannot be fetched (the Hub is out of reach in tests): what to run, in one line
    result = runner.invoke(app, ["scan", "whatever.mp4"])
    assert result.exit_code == 2
    assert "weights download xception-ffpp-c23" in result.stderr and "--weights" in result.stderr
    # a variant nothing is published for
    result = runner.invoke(app, ["scan", "whatever.mp4", "--variant", "temporal"])
    assert result.exit_code == 2
    assert "no published checkpoint for variant 'temporal'" in result.stderr and "xception-ffpp-c23" in result.stderr


def test_debug_variable_shows_traceback(tmp_path):
    result = run_cli("scan", "x.mp4", "--weights", tmp_path / "nope.safetensors", env={"DEEPSCAN_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr
    quiet = run_cli("scan", "x.mp4", "--weights", tmp_path / "nope.safetensors")
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().count("\n") == 0 and "nope.safetensors" in quiet.stderr


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_completions_are_not_stale(shell):
    committed = (REPO / "completions" / SHELLS[shell]).read_text(encoding="utf-8")
    assert committed == script(shell), "run: python -m deepscan.completions completions"


@pytest.mark.parametrize("args,words", [
    (["--variant", "huge"], "unknown variant"),
    (["--device", "gpu"], "--device must be"),
    (["--precision", "fp8"], "--precision must be"),
    (["--detector", "haar"], "unknown detector"),
    (["--aggregate", "mode"], "--aggregate must be"),
])
def test_misuse_is_one_line_and_exit_2(tiny_ckpt, media_dir, args, words):
    result = runner.invoke(app, ["scan", str(media_dir / "carphone.mp4"), "--weights", str(tiny_ckpt), *args])
    assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output


def test_offline_variable_set_before_start_fails_fast():
    import time

    t = time.monotonic()
    result = run_cli("weights", "download", "scrfd-10g", env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": ""})
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr
    assert time.monotonic() - t < 20  # process start included; no 45 s retry loop
