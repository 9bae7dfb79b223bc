"""Shared fixtures: tiny models, real face media made once per session, an isolated HF cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepscan.checkpoint import save_checkpoint
from deepscan.config import config_for_variant
from deepscan.model import LDADetector

from . import media

# A tiny but complete configuration: 62 px backbone input gives conv2 28 and block1 14,
# both multiples of the 2x2 grid of a 32 px LDA input with 16 px patches.
TINY = dict(image_size=62, lda_size=32)


def pytest_sessionstart(session):
    """Say so at once when the temporary folder is nearly full: the suite writes ~1 GB there at a
    time, and a full disk otherwise shows up as failures of whichever test writes next."""
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < 3 * 2**30:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"WARNING: {tempfile.gettempdir()} has {free / 2**30:.1f} GB free; the tests need "
                                "~1 GB there at a time", yellow=True, bold=True)


def under_file_size_limit(limit_kb: int, *argv, env: dict | None = None, timeout: float = 180):
    """Run ``argv`` (``-c CODE`` or ``-m deepscan ...``: Python's arguments) under ``ulimit -f``: the
    kernel refuses writes past it (EFBIG, as a full disk refuses them with ENOSPC; Python ignores
    SIGXFSZ), a real I/O failure without filling a disk or mounting one. The project's root is
    on PYTHONPATH."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run(["bash", "-c", f'ulimit -f {int(limit_kb)}; exec "$@"', "-", sys.executable,
                           *map(str, argv)], capture_output=True, text=True, timeout=timeout, env=env)


def tiny_config(variant: str = "spatial-temporal", **kw):
    return config_for_variant(variant, **{**TINY, **kw})


def tiny_model(variant: str = "spatial-temporal", seed: int = 0, **kw) -> LDADetector:
    torch.manual_seed(seed)
    return LDADetector(tiny_config(variant, **kw)).eval()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test may touch the real Hub or the user's cache."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DEEPSCAN_MANIFEST", raising=False)
    monkeypatch.delenv("DEEPSCAN_DEBUG", raising=False)
    # deepscan's own cache (BlazeFace's ONNX export, OpenVINO models): one per test session
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    shutil.copy(media.carphone(), d / "carphone.mp4")
    media.face_video(d / "astronaut.mp4")
    media.two_face_video(d / "two_faces.mp4")
    media.noise_video(d / "no_face.mp4")
    media.rotated_video(d / "rotated.mp4")
    media.vfr_video(d / "vfr.mp4")
    media.audio_only(d / "audio.m4a")
    media.write_video(d / "one_frame.mp4", media.moving(media.astronaut()[:300, 100:400], 1))
    media.truncated(media.face_video(d / "faststart.mp4", faststart=True), d / "truncated.mp4")
    media.truncated(d / "astronaut.mp4", d / "no_index.mp4")  # index at the end: nothing decodes
    return d


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-st.safetensors"
    save_checkpoint(tiny_model(), path, untrained=True, provenance={"data": "none"})
    return path
