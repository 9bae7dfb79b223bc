"""Self-describing checkpoints: safetensors tensors plus JSON metadata in the same file.

The safetensors header carries one metadata key, ``deepscan``, whose JSON value holds
everything needed to rebuild and use the model:

    {"format": 1, "variant": ..., "config": {...ModelConfig...},
     "preprocessing": {"image_size", "lda_size", "mean", "std", "clip_len", "crop_margin"},
     "provenance": {"data", "epochs", "metrics", "created", "deepscan_version", ...},
     "untrained": bool}

Nothing is ever unpickled: a file that is not safetensors is refused before it is parsed.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .config import CROP_MARGIN, ModelConfig
from .errors import ConfigError, WeightsError
from .model import LDADetector

FORMAT_VERSION = 1
METADATA_KEY = "deepscan"
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar"}


@dataclass(frozen=True)
class CheckpointInfo:
    """The metadata of a checkpoint, without its tensors."""

    config: ModelConfig
    untrained: bool
    provenance: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    path: str = ""

    @property
    def variant(self) -> str:
        return self.config.variant


def preprocessing_for(cfg: ModelConfig) -> dict:
    return {
        "image_size": cfg.image_size,
        "lda_size": cfg.lda_size,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "clip_len": cfg.clip_len,
        "crop_margin": CROP_MARGIN,
    }


def save_checkpoint(
    model: LDADetector,
    path: str | os.PathLike,
    *,
    untrained: bool,
    provenance: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model weights (and optional extra tensors, e.g. optimizer state) atomically."""
    cfg = model.config
    prov = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "deepscan_version": __version__}
    prov.update(provenance or {})
    meta = {
        "format": FORMAT_VERSION,
        "variant": cfg.variant,
        "config": cfg.to_dict(),
        "preprocessing": preprocessing_for(cfg),
        "provenance": prov,
        "untrained": bool(untrained),
    }
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().contiguous().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file, without executing or parsing it."""
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found; pass an existing .safetensors file")
    with open(path, "rb") as f:
        head = f.read(9)
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not is_safetensors or path.suffix.lower() in _PICKLE_SUFFIXES:
        looks_pickle = head[:1] == b"\x80" or head[:2] == b"PK"
        what = "a pickle/torch.save file" if looks_pickle else "not a safetensors file"
        raise WeightsError(
            f"{path}: {what}; deepscan loads only .safetensors checkpoints and never unpickles "
            "(convert it with safetensors.torch.save_file after checking its origin)"
        )
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > path.stat().st_size:
        raise WeightsError(f"{path}: truncated safetensors file; download or copy it again")


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    path = Path(path)
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"{path}: unreadable safetensors file ({exc}); download or copy it again") from None
    if raw is None:
        raise WeightsError(f"{path}: a safetensors file without deepscan metadata; it is not a deepscan checkpoint")
    try:
        meta = json.loads(raw)
        if meta.get("format") != FORMAT_VERSION:
            raise WeightsError(f"{path}: checkpoint format {meta.get('format')} is not supported (expected {FORMAT_VERSION}); upgrade deepscan")
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, json.JSONDecodeError, ConfigError, TypeError) as exc:
        raise WeightsError(f"{path}: damaged deepscan metadata ({exc})") from None
    return CheckpointInfo(
        config=cfg,
        untrained=bool(meta.get("untrained", True)),
        provenance=meta.get("provenance", {}),
        preprocessing=meta.get("preprocessing", {}),
        path=str(path),
    )


def load_tensors(path: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix):
                out[key[len(prefix):]] = f.get_tensor(key)
    return out


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LDADetector, CheckpointInfo]:
    """Rebuild the model from the file alone, weights loaded strictly, in eval mode."""
    info = read_info(path)
    model = LDADetector(info.config)
    state = load_tensors(path, "model.")
    try:
        model.load_state_dict(state, strict=True, assign=True)  # use the loaded tensors: no second copy
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsError(f"{path}: weights do not match the {info.variant} config ({first})") from None
    return model.to(device).eval(), info
