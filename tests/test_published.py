"""The published FF++ Xception (DeepfakeBench's xception_best.pth): manifest pins, safe conversion,
its preprocessing in scans, the default model, and training from it. The real file is never
downloaded here: a synthetic state dict of its exact layout is served by the fake Hub."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deepscan import weights
from deepscan.checkpoint import load_checkpoint, read_info
from deepscan.cli import app
from deepscan.convert import convert
from deepscan.errors import ConfigError, WeightsError

from . import deepfakebench
from .fakehub import FakeHub

runner = CliRunner()
NAME = "xception-ffpp-c23"


def shipped_entries() -> list[dict]:
    return json.loads(Path(weights.__file__).with_name("weights_manifest.json").read_text())["entries"]


@pytest.fixture(scope="session")
def pth(tmp_path_factory) -> Path:
    return deepfakebench.write(tmp_path_factory.mktemp("dfb") / "xception_best.pth")


@pytest.fixture
def published(pth, tmp_path, monkeypatch):
    """The shipped entry, pinned to the synthetic file's sha256, served on 127.0.0.1."""
    shipped = shipped_entries()
    raw = {**next(e for e in shipped if e["name"] == NAME), "sha256": hashlib.sha256(pth.read_bytes()).hexdigest()}
    manifest = tmp_path / "manifest.json"  # the shipped one (BlazeFace's files too), this entry re-pinned
    manifest.write_text(json.dumps({"schema": 1, "entries": [raw if e["name"] == NAME else e for e in shipped]}))
    monkeypatch.setenv("DEEPSCAN_MANIFEST", str(manifest))
    with FakeHub() as hub:
        hub.files[(raw["repo_id"], raw["revision"], raw["filename"])] = pth.read_bytes()
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub, weights.load_manifest().get(NAME)


def test_shipped_manifest_pins_the_published_xception():
    m = weights.load_manifest()
    e = m.get(NAME)
    assert m.models()[0] is e  # the best published model: what a scan without --weights uses
    assert (e.kind, e.variant, e.format, e.repo_id) == ("model", "xception", "deepfakebench", "dubm/ucf-s")
    assert e.revision == "557e85c8eeabd8c266800b4c7c952275ed2e503c"
    assert e.sha256 == "dd61186f9ac8e99aae85982cae338b555dfaeef042f6b699e5a55cae3998ba47"
    assert e.size is None and 80e6 < e.approx_size < 95e6  # no public record of the exact size: not invented
    assert "CC BY-NC 4.0" in e.license and "non-commercial" in e.license and "DeepfakeBench v1.0.1" in e.origin
    assert e.metrics["frame_auc"] == {"FF++ c23": 0.9637, "Celeb-DF v2": 0.7365} and "DeepfakeBench" in e.metrics["source"]
    assert e.preprocessing["image_size"] == 256 and e.preprocessing["alignment"] == "deepfakebench-5pt"
    # mirrors whose full commit is on no public record are listed, never fetched
    assert {a["repo_id"] for a in e.alternates} == {"bitmind/bm-ucf", "bitmind/spsl"}
    assert all(a["revision"] is None for a in e.alternates) and e.sources() == [(e.repo_id, e.revision, e.filename)]
    result = runner.invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0
    row = next(r for r in json.loads(result.stdout)["entries"] if r["name"] == NAME)
    assert row["kind"] == "model" and row["cached"] is False


def test_conversion_equals_timm_legacy_xception(pth, tmp_path):
    state = torch.load(pth, weights_only=True)
    assert len(state) == 283 and sum(k.startswith("backbone.adjust_channel.") for k in state) == 7
    out = convert(pth, tmp_path / "x.safetensors", provenance={"name": "x"})
    model, info = load_checkpoint(out)  # strict
    assert info.variant == "xception" and not info.untrained and info.config.image_size == 256
    assert info.preprocessing["crop_margin"] == 1.3 and info.alignment == "deepfakebench-5pt"
    assert info.config.mean == (0.5, 0.5, 0.5) and info.config.std == (0.5, 0.5, 0.5)
    ref = deepfakebench.timm_reference(state)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-5
    # the same file converts to the same bytes (no date inside): one sha256 everywhere
    again = convert(pth, tmp_path / "y.safetensors", provenance={"name": "x"})
    assert again.read_bytes() == out.read_bytes()


def test_2d_pointwise_weights_are_given_their_kernel_dimensions(tmp_path):
    state = deepfakebench.state_dict(seed=1, pointwise_2d=True)
    assert state["backbone.block1.rep.0.pointwise.weight"].dim() == 2
    model, _ = load_checkpoint(convert(deepfakebench.write(tmp_path / "old.pth", state), tmp_path / "o.safetensors"))
    ref = deepfakebench.timm_reference(state)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-5


class _Runs:
    """Unpickling this runs a shell command (the attack a pickled checkpoint can carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    good = deepfakebench.state_dict(seed=2)
    files = {}
    files["plain pickle"] = tmp_path / "plain.pth"
    files["plain pickle"].write_bytes(pickle.dumps(_Runs(marker), protocol=2))
    files["object in a torch file"] = deepfakebench.write(tmp_path / "obj.pth", {**good, "extra": _Runs(marker)})
    files["int value"] = deepfakebench.write(tmp_path / "int.pth", {**good, "epoch": 7})
    missing = dict(good)
    del missing["backbone.bn4.running_var"]
    files["missing key"] = deepfakebench.write(tmp_path / "missing.pth", missing)
    files["extra key"] = deepfakebench.write(tmp_path / "extra.pth", {**good, "backbone.head2.weight": torch.zeros(2)})
    files["wrong shape"] = deepfakebench.write(tmp_path / "shape.pth", {**good, "backbone.last_linear.weight": torch.zeros(3, 2048)})
    files["not torch"] = tmp_path / "text.pth"
    files["not torch"].write_text("hello")
    return files


@pytest.mark.parametrize("kind,message", [
    ("plain pickle", "something other than tensors"), ("object in a torch file", "something other than tensors"),
    ("int value", "not a tensor"), ("missing key", "bn4.running_var is missing"), ("extra key", "unexpected tensor"),
    ("wrong shape", "has shape"), ("not torch", "not a readable torch.save file"),
])
def test_hostile_or_wrong_pickles_are_refused_without_running(tmp_path, kind, message):
    marker = tmp_path / "ran"
    src = _hostile_files(tmp_path, marker)[kind]
    assert not marker.exists()  # writing the files ran nothing either
    with pytest.raises(WeightsError, match=message) as exc:
        convert(src, tmp_path / "out.safetensors")
    assert "\n" not in str(exc.value) and not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_a_wrong_hash_is_refused_before_the_pickle_is_read(published, tmp_path):
    hub, entry = published
    marker = tmp_path / "ran"
    hub.files[(entry.repo_id, entry.revision, entry.filename)] = pickle.dumps(_Runs(marker), protocol=2)
    with pytest.raises(WeightsError, match="does not match the manifest"):
        weights.resolve_checkpoint(None, None, weights.load_manifest())
    assert not marker.exists() and weights.cached(entry) is None


def test_default_scan_fetches_verifies_converts_and_names_the_model(published, media_dir):
    hub, entry = published
    args = ["scan", str(media_dir / "astronaut.mp4"), "--json", "--clips", "2", "--backend", "torch", "--no-hash"]
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 1), result.output
    assert f"downloading {NAME}" in result.stderr and "licence: CC BY-NC 4.0" in result.stderr
    assert "converting" in result.stderr and "UNTRAINED" not in result.stderr
    assert f"model: {NAME} (xception); licence: CC BY-NC 4.0" in result.stderr
    rec = json.loads(result.stdout)
    assert rec["detector"] == "blazeface"
    path, sha = weights.converted(entry)
    assert rec["model"]["name"] == NAME and rec["model"]["variant"] == "xception" and not rec["model"]["untrained"]
    assert rec["model"]["sha256"] == sha == weights.sha256_file(path) and "CC BY-NC" in rec["model"]["license"]
    assert rec["sampling"]["aligned_face_clips"] == rec["sampling"]["face_clips"] >= 1  # BlazeFace's keypoints
    assert read_info(path).provenance["published"]["sha256"] == entry.sha256
    # the second scan reads the cached conversion: no request to the Hub, the same record
    n = len(hub.requests)
    again = runner.invoke(app, args)
    assert len(hub.requests) == n and "converting" not in again.stderr
    assert json.loads(again.stdout)["score"] == rec["score"]
    # the human table names model, sha and licence too
    table = runner.invoke(app, args[:2] + args[3:])
    assert f"{NAME} (xception, sha256 {sha[:12]}, licence: CC BY-NC" in " ".join(table.stdout.split())


def test_weights_download_prints_the_converted_checkpoint(published):
    _, entry = published
    result = runner.invoke(app, ["weights", "download", NAME])
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())
    assert path.suffix == ".safetensors" and read_info(path).name == NAME and "licence: CC BY-NC" in result.stderr


def test_a_damaged_conversion_is_made_again_from_the_verified_file(published):
    _, entry = published
    path, sha = weights.converted(entry)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    notes = []
    again, sha2 = weights.converted(entry, say=notes.append)
    assert sha2 == sha and weights.sha256_file(again) == sha
    assert any("does not match" in n for n in notes)


def test_offline_without_the_model_says_what_to_run_or_copy(media_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "deepscan", str(media_dir / "astronaut.mp4")], capture_output=True,
                       text=True, env=env, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("deepscan: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"deepscan weights download {NAME}" in errors[0] and "weights import FILE --from deepfakebench" in errors[0]


def test_weights_import_converts_a_users_file(published, pth, tmp_path):
    out = tmp_path / "mine.safetensors"
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "deepscan", "weights", "import", str(pth), "--from", "deepfakebench",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert NAME in r.stderr and "CC BY-NC" in r.stderr  # the sha256 is the manifest's: its provenance
    info = read_info(out)
    assert info.name == NAME and "CC BY-NC" in info.license and info.variant == "xception"
    marker = tmp_path / "ran"
    bad = _hostile_files(tmp_path, marker)["object in a torch file"]
    r = runner.invoke(app, ["weights", "import", str(bad), "--out", str(tmp_path / "bad.safetensors")])
    assert r.exit_code == 2, r.output
    assert not marker.exists() and len(r.stderr.strip().splitlines()) == 1 and "nothing in it was run" in r.stderr


def test_alignment_is_skimages_similarity_and_puts_landmarks_on_the_template():
    from skimage.transform import SimilarityTransform

    from deepscan import faces

    rng = np.random.default_rng(0)
    src = rng.uniform(100, 300, (5, 2))
    dst = faces.align_template(256, 1.3)
    ref = SimilarityTransform.from_estimate(src, dst) if hasattr(SimilarityTransform, "from_estimate") else None
    if ref is None:
        ref = SimilarityTransform()
        ref.estimate(src, dst)
    assert np.abs(faces.similarity(src, dst) - ref.params).max() < 1e-9
    # a face rotated and scaled in the frame lands where the template says, to the pixel
    angle, scale, shift = np.deg2rad(12), 1.7, np.array([40.0, 25.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (dst - 128) @ rot.T + 200 + shift
    m = faces.align_matrix(tuple(map(tuple, pts)), 256, 1.3)
    back = (m @ np.c_[pts, np.ones(5)].T).T[:, :2]
    assert np.abs(back - dst).max() < 1e-6
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[int(pts[2, 1]) - 2:int(pts[2, 1]) + 3, int(pts[2, 0]) - 2:int(pts[2, 0]) + 3] = 255  # a dot on the nose
    crop = faces.crop_aligned(frame, m, 256)
    ys, xs = np.nonzero(crop[..., 0] > 128)
    assert abs(xs.mean() - dst[2, 0]) < 1.0 and abs(ys.mean() - dst[2, 1]) < 1.0
    assert faces.align_matrix(None, 256, 1.3) is None  # dlib gives no landmarks: square crops


def test_aligned_checkpoints_need_the_workers_and_checked_preprocessing(pth, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from deepscan.scan import ScanSettings, pick_preparation

    with pytest.raises(ConfigError, match="preparation workers"):
        pick_preparation("device", "blazeface", "deepfakebench-5pt")
    assert pick_preparation("auto", "blazeface", "deepfakebench-5pt") == "workers"
    with pytest.raises(ConfigError, match="preparation workers"):
        ScanSettings(preparation="device", alignment="deepfakebench-5pt")
    out = convert(pth, tmp_path / "x.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["deepscan"]), {k: f.get_tensor(k) for k in f.keys()}
    for change, message in (({"crop_margin": 40}, "crop_margin"), ({"alignment": "tps"}, "alignment"),
                            ({"mean": [0.4, 0.4, 0.4]}, "mean")):
        bad = {**meta, "preprocessing": {**meta["preprocessing"], **change}}
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"deepscan": json.dumps(bad)})
        with pytest.raises(WeightsError, match=message):
            read_info(tmp_path / "bad.safetensors")


def test_lda_training_can_start_from_the_published_backbone(published, tmp_path):
    from deepscan.train import TrainConfig, build

    _, entry = published
    cfg = TrainConfig(out=str(tmp_path / "run"), variant="spatial", image_size=62, lda_size=32, vit_init="random",
                      backbone_init=NAME)
    model, init = build(cfg)
    path, sha = weights.converted(entry)
    xcp, _ = load_checkpoint(path)
    assert init.startswith(f"backbone from {NAME}") and sha in init and "CC BY-NC" in init
    for (k, a), b in zip(model.backbone.state_dict().items(), xcp.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="neither a published model"):
        build(TrainConfig(out=str(tmp_path / "r2"), variant="spatial", vit_init="random", backbone_init="nope"))
    assert "--backbone-init" in runner.invoke(app, ["train", "--help"]).stdout


def test_eval_crops_faces_the_checkpoints_way(tmp_path):
    """`eval` of an aligned checkpoint prepares aligned crops (in their own cache: the settings
    differ), and a cache made before alignment existed still reads as unaligned."""
    from deepscan.data import load_dataset
    from deepscan.faces import resolve_detector
    from deepscan.prepare import PrepareSettings, check_cache, load_cache, open_arrays, prepare

    from . import media

    root = media.make_dataset(tmp_path / "data", "folders", per_split=1)
    _, items = load_dataset(root, "folders")
    det = resolve_detector("blazeface", manifest=weights.load_manifest(), say=print).build()
    crops = {}
    for alignment in ("none", "deepfakebench-5pt"):
        cache = tmp_path / alignment
        settings = PrepareSettings(image_size=64, lda_size=32, clip_len=1, clips=2, alignment=alignment)
        prepare(items, cache, det, settings)
        recorded = json.loads((cache / "cache.json").read_text())
        assert ("alignment" in recorded) == (alignment != "none")
        with pytest.raises(ConfigError, match="other settings"):
            check_cache(cache, PrepareSettings(image_size=64, lda_size=32, clip_len=1, clips=2,
                                               alignment="none" if alignment != "none" else "deepfakebench-5pt"))
        crops[alignment] = open_arrays(load_cache(cache, items)[0])[0][0].astype(float)
    assert np.abs(crops["none"] - crops["deepfakebench-5pt"]).mean() > 5  # another cut of the same face


def test_a_partial_file_renamed_while_it_is_measured_is_not_an_error(tmp_path, monkeypatch):
    """The download watcher lists the partial files, then measures them: one renamed in between
    (the download has just finished) counts as nothing (it was a FileNotFoundError that failed a
    finished download, seen once in CI)."""
    (tmp_path / "a.incomplete").write_bytes(b"x" * 10)
    gone = tmp_path / "b.incomplete"
    listed = [tmp_path / "a.incomplete", gone]  # b is listed, then renamed before its stat
    monkeypatch.setattr(type(tmp_path), "glob", lambda self, pattern: iter(listed))
    assert weights.partial_bytes(tmp_path) == 10
