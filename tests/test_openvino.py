"""The OpenVINO backend: the torch runner's scores and maps, its converted model kept on disk
(reused, and made again for another checkpoint), telemetry kept out, and clear errors."""

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepscan.checkpoint import save_checkpoint
from deepscan.errors import ConfigError
from deepscan.scan.score_openvino import OpenVinoRunner, installed, pick_backend
from deepscan.scan import Runner

from .conftest import tiny_model, under_file_size_limit
from .test_hostile import cli, one_line_error

# not importorskip: importing openvino here, before deepscan does, would load its telemetry
pytestmark = pytest.mark.skipif(not installed(), reason="OpenVINO is a dependency on x86-64 only (pyproject.toml)")


def spread_model(variant: str = "spatial-temporal", seed: int = 0):
    """A tiny model whose P(fake) spreads over (0, 1) on random crops: a random backbone's pooled
    features differ little from one input to the next, so its head is scaled up (x2e5 gives
    0.17-0.63 on the crops below; untouched, every score is 0.502, which would hide differences)."""
    model = tiny_model(variant, seed=seed)
    with torch.no_grad():
        model.backbone.get_classifier().weight.mul_(2e5)
    return model


def crops(cfg, n: int = 6, seed: int = 1):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, cfg.image_size, cfg.image_size, 3), np.uint8)
    frames = rng.integers(0, 255, (n, cfg.clip_len, cfg.lda_size, cfg.lda_size, 3), np.uint8)
    return images, frames


@pytest.mark.parametrize("variant", ["spatial-temporal", "xception"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.02)], ids=["fp32", "bf16"])
def test_openvino_gives_the_torch_scores_and_maps(variant, dtype, tol):
    model = spread_model(variant)
    images, frames = crops(model.config)
    want, want_maps = Runner(copy.deepcopy(model), torch.device("cpu"), dtype).score(images, frames)
    got, got_maps = OpenVinoRunner(copy.deepcopy(model), dtype, key=f"test-{variant}").score(images, frames)
    assert want.max() - want.min() > 0.3, want  # the scores spread, so equality means something
    np.testing.assert_allclose(got, want, atol=tol)
    assert sorted(got_maps) == sorted(want_maps) == (["spatial", "temporal"] if variant != "xception" else [])
    for k in want_maps:
        assert got_maps[k].shape == want_maps[k].shape and got_maps[k].dtype == np.float32
        np.testing.assert_allclose(got_maps[k], want_maps[k], atol=max(tol, 1e-4) * 5)


def test_the_converted_model_is_kept_and_made_again_for_another_checkpoint(monkeypatch):
    import openvino

    model = spread_model(seed=3)
    first = OpenVinoRunner(copy.deepcopy(model), torch.float32, key="sha-a")
    assert first.cold

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    again = OpenVinoRunner(copy.deepcopy(model), torch.float32, key="sha-a")
    assert not again.cold
    images, frames = crops(model.config, 2)
    np.testing.assert_array_equal(again.score(images, frames)[0], first.score(images, frames)[0])
    with pytest.raises(AssertionError, match="converted again"):
        OpenVinoRunner(copy.deepcopy(model), torch.float32, key="sha-b")  # another checkpoint: converted anew


def test_a_damaged_cache_entry_is_made_again():
    from deepscan.scan.score_openvino import cache_root

    model = spread_model(seed=4)
    before = set(cache_root().glob("*/model.xml"))
    OpenVinoRunner(copy.deepcopy(model), torch.float32, key="sha-damaged")
    (ours,) = set(cache_root().glob("*/model.xml")) - before
    ours.write_text("not xml")
    runner = OpenVinoRunner(copy.deepcopy(model), torch.float32, key="sha-damaged")
    assert runner.cold and np.isfinite(runner.score(*crops(model.config, 1))[0]).all()


def test_a_cache_that_cannot_take_the_model_costs_a_note_not_the_scan(tmp_path):
    """A real write failure (a file-size limit: OpenVINO's writer fails as it would on a full
    disk): the converted model is used from memory, with one note, and nothing half-written is kept."""
    code = ("import copy, numpy as np, torch\n"
            "from deepscan.scan.score_openvino import OpenVinoRunner, cache_root\n"
            "from deepscan.scan import Runner\n"
            "from tests.test_openvino import spread_model, crops\n"
            "m = spread_model(seed=5)\n"
            "notes = []\n"
            "r = OpenVinoRunner(copy.deepcopy(m), torch.float32, key='sha-full', say=notes.append)\n"
            "want = Runner(copy.deepcopy(m), torch.device('cpu'), torch.float32).score(*crops(m.config, 3))[0]\n"
            "np.testing.assert_allclose(r.score(*crops(m.config, 3))[0], want, atol=1e-4)\n"
            "print(notes)\n"
            "print(sorted(p.name for p in cache_root().rglob('*')))\n")
    r = under_file_size_limit(64, "-c", code, env={"XDG_CACHE_HOME": str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stderr
    notes, kept = r.stdout.splitlines()
    assert "cannot keep the converted model" in notes and "from memory" in notes, notes
    assert kept == "[]", kept  # no entry, no temporary folder


def test_openvino_telemetry_stays_out(tmp_path):
    """In a fresh process, as a scan runs it: the model converted, and OpenVINO's telemetry package
    never loaded (its converter uses OpenVINO's built-in stub), whatever the consent file says."""
    import subprocess

    code = (
        "import sys, torch\n"
        "from deepscan.scan.score_openvino import OpenVinoRunner\n"
        "from tests.test_openvino import spread_model\n"
        "OpenVinoRunner(spread_model(seed=5), torch.float32, key='sha-telemetry')\n"
        "import openvino.tools.ovc.telemetry_utils as t\n"
        "print(sys.modules.get('openvino_telemetry'), t.tm.__name__)\n"
    )
    env = {**os.environ, "HOME": str(tmp_path)}  # no consent file: OpenVINO would send by default
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "openvino.tools.ovc.telemetry_stub"], r.stdout
    assert not (tmp_path / "intel").exists()  # no consent file or client id written either


def test_a_scan_with_openvino_gives_the_torch_verdicts_and_heatmaps(media_dir, tmp_path):
    ckpt = tmp_path / "spread.safetensors"
    save_checkpoint(spread_model(seed=7), ckpt, untrained=True)
    records = {}
    for backend in ("torch", "openvino"):
        r = cli(media_dir / "two_faces.mp4", media_dir / "astronaut.mp4", "--weights", ckpt, "--json", "--clips", "4",
                "--backend", backend, "--precision", "fp32", "--workers", "1", "--heatmaps", tmp_path / backend,
                "--no-hash")
        assert r.returncode in (0, 1), r.stderr
        records[backend] = [json.loads(line) for line in r.stdout.splitlines()]
    for a, b in zip(records["torch"], records["openvino"]):
        assert a["model"]["backend"] == "torch" and b["model"]["backend"] == "openvino"
        assert a["verdict"] == b["verdict"] and abs(a["score"] - b["score"]) < 1e-4
        scores = [[f["score"] for f in t["frames"]] for t in a["tracks"]]
        assert scores and np.allclose(scores, [[f["score"] for f in t["frames"]] for t in b["tracks"]], atol=1e-4)
        assert a["heatmaps"] and b["heatmaps"]
        pngs = [sorted(p.name for p in Path(r["heatmaps"]).glob("*.png")) for r in (a, b)]
        assert pngs[0] == pngs[1] and pngs[0], pngs


def test_without_openvino_auto_is_torch_and_asking_for_it_is_one_line(monkeypatch, media_dir, tiny_ckpt):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    assert pick_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="pip install openvino"):
        pick_backend("openvino", torch.device("cpu"))
    r = cli(media_dir / "no_face.mp4", "--weights", tiny_ckpt, "--backend", "openvino", "--clips", "2")
    assert r.returncode == 2
    one_line_error(r, "OpenVINO is not installed", "pip install openvino")


def test_backend_choices_are_checked():
    with pytest.raises(ConfigError, match="unknown backend 'onnx'"):
        pick_backend("onnx", torch.device("cpu"))
    with pytest.raises(ConfigError, match="runs on the CPU"):
        pick_backend("openvino", torch.device("cuda", 0))
    assert pick_backend("auto", torch.device("cuda", 0)) == "torch"
    assert pick_backend("auto", torch.device("cpu")) == "openvino"


LEAN_PROBE = """
import json, sys
from deepscan.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code, "loaded": sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)}),
      file=sys.stderr)
"""


def test_a_scan_from_the_cached_model_never_imports_torch(media_dir, tmp_path):
    """The lean start: with the converted model in the cache, a CPU scan on OpenVINO runs without
    torch, timm or the checkpoint's tensors in its process, and gives the records of the scan that
    converted (which did load them)."""
    import subprocess

    ckpt = tmp_path / "spread.safetensors"
    save_checkpoint(spread_model(seed=8), ckpt, untrained=True)
    args = ["scan", str(media_dir / "astronaut.mp4"), "--weights", str(ckpt), "--json", "--clips", "4",
            "--backend", "openvino", "--precision", "fp32", "--workers", "1", "--no-hash"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    runs = []
    for _ in range(2):  # the first converts (torch loaded), the second starts from the cache
        r = subprocess.run([sys.executable, "-c", LEAN_PROBE, *args], capture_output=True, text=True, env=env,
                           timeout=300, cwd=Path(__file__).resolve().parents[1])
        status = json.loads(r.stderr.splitlines()[-1])
        assert status["exit"] in (0, 1), r.stderr
        runs.append((status, [json.loads(line) for line in r.stdout.splitlines()]))
    (first, want), (second, got) = runs
    assert "torch" in first["loaded"]  # converting needs the model
    assert second["loaded"] == [], second
    for a, b in zip(want, got, strict=True):
        for rec in (a, b):
            rec.pop("timings")
        assert a == b
