import hashlib
import json
import time

import pytest

from deepscan import weights
from deepscan.errors import WeightsError

from .fakehub import FakeHub

REPO, REV, FILE = "deepscan-test/detector", "0123456789abcdef0123456789abcdef01234567", "detection/model.onnx"
PAYLOAD = b"not really onnx, but bytes with a known hash " * 1000


def entry_dict(**kw):
    d = {
        "name": "test-det", "kind": "detector", "variant": None, "repo_id": REPO, "revision": REV,
        "filename": FILE, "sha256": hashlib.sha256(PAYLOAD).hexdigest(), "size": len(PAYLOAD),
        "license": "test", "preprocessing": None, "metrics": None, "description": "test file",
    }
    d.update(kw)
    return d


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as h:
        h.files[(REPO, REV, FILE)] = PAYLOAD
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


@pytest.fixture
def entry(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema": 1, "entries": [entry_dict()]}))
    monkeypatch.setenv("DEEPSCAN_MANIFEST", str(path))
    return weights.load_manifest().get("test-det")


def test_shipped_manifest_is_valid_and_pins_commits():
    m = weights.load_manifest()
    det = m.detector()
    assert det is not None and len(det.revision) == 40 and "non-commercial" in det.license
    assert [e.name for e in m.models()] == ["xception-ffpp-c23"]  # the published Xception (test_published.py)


def test_first_download_then_cache_hit_without_network(hub, entry):
    path = weights.fetch(entry)
    assert path.read_bytes() == PAYLOAD
    n = len(hub.requests)
    hub.stop()
    assert weights.fetch(entry) == path  # the server is gone: this must be the cache
    assert len(hub.requests) == n


def test_offline_env_uses_cache_and_fails_fast_when_uncached(hub, entry, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):
        weights.fetch(entry)
    assert time.monotonic() - t < 5 and hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    weights.fetch(entry)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.fetch(entry).read_bytes() == PAYLOAD


def test_server_down_fails_within_seconds(entry, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t = time.monotonic()
    with pytest.raises(WeightsError, match="cannot be reached.*weights download test-det"):
        weights.fetch(entry)
    assert time.monotonic() - t < 5


def test_a_cache_without_room_says_so_not_try_again(hub, entry):
    """A real write failure (a file-size limit, as a full disk does) while storing the download."""
    from .conftest import under_file_size_limit

    r = under_file_size_limit(16, "-m", "deepscan", "weights", "download", "test-det", timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("deepscan: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot store it in" in errors[0] and "File too large" in errors[0] and "try again" not in errors[0]
    assert weights.cached(entry) is None


def test_tampered_download_is_refused_and_removed(hub, entry):
    hub.mode = "tamper"
    with pytest.raises(WeightsError, match="does not match the manifest"):
        weights.fetch(entry)
    assert weights.cached(entry) is None


def test_corrupt_cache_is_refused_until_forced(hub, entry):
    path = weights.fetch(entry)
    blob = path.resolve()
    blob.write_bytes(PAYLOAD[:-1] + b"X")
    with pytest.raises(WeightsError, match="corrupt.*--force"):
        weights.fetch(entry)
    assert weights.fetch(entry, force=True).read_bytes() == PAYLOAD


def test_truncated_transfer_is_an_error(hub, entry):
    hub.mode = "truncate"
    with pytest.raises(WeightsError):
        weights.fetch(entry)
    assert weights.cached(entry) is None


@pytest.mark.parametrize("change,field", [
    ({"revision": "main"}, "revision"),
    ({"sha256": "abc"}, "sha256"),
    ({"kind": "weights"}, "kind"),
    ({"size": -1}, "size"),
    ({"kind": "model", "variant": "spatial", "filename": "model.pt"}, "filename"),
    ({"kind": "model", "variant": "huge"}, "variant"),
    ({"colour": "red"}, "colour"),
])
def test_manifest_validation_names_entry_and_field(change, field):
    with pytest.raises(WeightsError, match=rf"entry 0 \('test-det'\): field '{field}'"):
        weights.parse_manifest({"schema": 1, "entries": [entry_dict(**change)]}, "m.json")


def test_manifest_file_errors(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        weights.load_manifest(bad)
    with pytest.raises(WeightsError, match="schema"):
        weights.parse_manifest({"entries": []})


def test_publish_then_download_round_trip(hub, tmp_path, monkeypatch, media_dir):
    from deepscan.checkpoint import load_checkpoint, save_checkpoint

    from .conftest import tiny_model

    ckpt = save_checkpoint(tiny_model("spatial"), tmp_path / "trained.safetensors", untrained=False,
                           provenance={"data": "tiny", "epochs": 1, "metrics": {"video_auc": 0.5}})
    entry = weights.publish(ckpt, "deepscan-test/model", name="tiny-spatial")
    assert entry["kind"] == "model" and entry["variant"] == "spatial" and len(entry["revision"]) == 40
    assert entry["sha256"] == weights.sha256_file(ckpt) and entry["metrics"] == {"video_auc": 0.5}
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"schema": 1, "entries": [entry]}))
    monkeypatch.setenv("DEEPSCAN_MANIFEST", str(manifest))
    m = weights.load_manifest()
    path, sha = weights.resolve_checkpoint("spatial", None, m)
    assert sha == entry["sha256"] == weights.sha256_file(path)
    model, info = load_checkpoint(path)
    assert info.variant == "spatial" and not info.untrained
    # A scan with no --weights uses the manifest's model and reports the verified hash.
    from typer.testing import CliRunner

    from deepscan.cli import app

    result = CliRunner().invoke(app, ["scan", str(media_dir / "carphone.mp4"), "--variant", "spatial", "--json",
                                      "--clips", "2", "--detector", "dlib", "--no-hash"])
    assert result.exit_code in (0, 1), result.output
    rec = json.loads(result.stdout)
    assert rec["model"] == {"name": "trained", "variant": "spatial", "checkpoint": "trained.safetensors",
                            "sha256": entry["sha256"], "license": None, "untrained": False,
                            "backend": rec["model"]["backend"]}
    assert rec["model"]["backend"] in ("torch", "openvino")


def test_untrained_checkpoints_are_not_published(hub, tmp_path):
    from deepscan.checkpoint import save_checkpoint

    from .conftest import tiny_model

    ckpt = save_checkpoint(tiny_model("spatial"), tmp_path / "u.safetensors", untrained=True)
    with pytest.raises(WeightsError, match="untrained"):
        weights.publish(ckpt, "deepscan-test/model")
