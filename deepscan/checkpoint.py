"""Self-describing checkpoints: safetensors tensors plus JSON metadata in the same file.

The safetensors header carries one metadata key, ``deepscan``, whose JSON value holds
everything needed to rebuild and use the model:

    {"format": 1, "variant": ..., "config": {...ModelConfig...},
     "preprocessing": {"image_size", "lda_size", "mean", "std", "clip_len", "crop_margin", "alignment"},
     "provenance": {"data", "epochs", "metrics", "created", "deepscan_version", "name", "license", ...},
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

from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from . import __version__
from .config import ALIGNMENTS, CROP_MARGIN, ModelConfig
from .errors import ConfigError, WeightsError, io_reason

if TYPE_CHECKING:  # torch and the model (timm) load only where tensors are made or read
    import torch

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

    @property
    def name(self) -> str:
        """The published model's name (e.g. xception-ffpp-c23), else the file's stem."""
        return str(self.provenance.get("name") or Path(self.path).stem)

    @property
    def license(self) -> str | None:
        lic = self.provenance.get("license")
        return lic if isinstance(lic, str) else None

    @property
    def crop_margin(self) -> float:
        return float(self.preprocessing.get("crop_margin", CROP_MARGIN))

    @property
    def alignment(self) -> str:
        return str(self.preprocessing.get("alignment", "none"))


def preprocessing_for(cfg: ModelConfig, *, crop_margin: float = CROP_MARGIN, alignment: str = "none") -> dict:
    """How faces are cut for this model: sizes and n from its config, the margin around the
    detector's box, and the alignment ("none": a square around the box; "deepfakebench-5pt": a
    similarity transform of the landmarks onto DeepfakeBench's template, see faces.align_template)."""
    return {
        "image_size": cfg.image_size,
        "lda_size": cfg.lda_size,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "clip_len": cfg.clip_len,
        "crop_margin": crop_margin,
        "alignment": alignment,
    }


def save_checkpoint(
    model: LDADetector,
    path: str | os.PathLike,
    *,
    untrained: bool,
    provenance: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    crop_margin: float = CROP_MARGIN,
    alignment: str = "none",
    dated: bool = True,
) -> Path:
    """Write model weights (and optional extra tensors, e.g. optimizer state) atomically.
    ``dated=False`` leaves the creation time out, so the same weights give the same bytes (a
    converted published model has one sha256 everywhere)."""
    from safetensors.torch import save_file

    cfg = model.config
    prov = {"deepscan_version": __version__}
    if dated:
        prov["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    prov.update(provenance or {})
    meta = {
        "format": FORMAT_VERSION,
        "variant": cfg.variant,
        "config": cfg.to_dict(),
        "preprocessing": preprocessing_for(cfg, crop_margin=crop_margin, alignment=alignment),
        "provenance": prov,
        "untrained": bool(untrained),
    }
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().contiguous().cpu()
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder; give a file name ending in .safetensors")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        # safetensors reports its own I/O failures (a full disk, a file-size limit) as
        # SafetensorError("... I/O error: No space left on device (os error 28)")
        why = io_reason(exc)
        if any(p.is_file() for p in path.parents):
            why = "a part of the path is a file, not a folder"
        raise WeightsError(f"{path}: cannot write the checkpoint there ({why}); choose a writable place with room for it") from None
    finally:
        if tmp and os.path.exists(tmp):
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


MAX_HEADER = 100 << 20  # the safetensors format's own limit on a header


def header_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its JSON header with the checks
    ``safe_open`` makes (a header within the format's limit, tensors that cover the data exactly).
    By hand because safetensors reads metadata only through a framework, and its numpy one loads
    numpy (~0.06 s) into processes that need none: ``scan --server`` clients, ``weights list``."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > MAX_HEADER:
            raise ValueError(f"a header of {size} bytes")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"its header is not JSON: {exc}") from None
        data = os.fstat(f.fileno()).st_size - 8 - size
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("its __metadata__ is not an object of strings")
    end = 0
    for name, t in header.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if end != data:
        raise ValueError(f"its tensors cover {end} bytes of {data}: the file is truncated or has extra bytes")
    return meta


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    path = Path(path)
    check_safetensors(path)
    try:
        raw = header_metadata(path).get(METADATA_KEY)
    except ValueError as exc:
        raise WeightsError(f"{path}: unreadable safetensors file ({exc}); download or copy it again") from None
    if raw is None:
        raise WeightsError(f"{path}: a safetensors file without deepscan metadata; it is not a deepscan checkpoint")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise WeightsError(f"{path}: damaged deepscan metadata (not JSON: {exc})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: damaged deepscan metadata (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT_VERSION:
        raise WeightsError(f"{path}: checkpoint format {meta.get('format')!r} is not supported "
                           f"(expected {FORMAT_VERSION}); upgrade deepscan")
    if "config" not in meta:
        raise WeightsError(f"{path}: damaged deepscan metadata (no 'config' field)")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise WeightsError(f"{path}: damaged deepscan metadata, field 'config': {exc}") from None
    except TypeError as exc:
        raise WeightsError(f"{path}: damaged deepscan metadata, field 'config': {exc}") from None
    for key in ("provenance", "preprocessing"):
        if not isinstance(meta.get(key, {}), dict):
            raise WeightsError(f"{path}: damaged deepscan metadata, field {key!r} must be an object")
    pre = meta.get("preprocessing", {})
    want = preprocessing_for(cfg)
    for key in ("image_size", "lda_size", "clip_len"):  # what cropping needs; they must match the model
        if not isinstance(pre.get(key), int) or isinstance(pre.get(key), bool) or pre[key] != want[key]:
            raise WeightsError(f"{path}: damaged deepscan metadata, field 'preprocessing' needs {key} = "
                               f"{want[key]} (the model's), not {pre.get(key)!r}")
    margin = pre.get("crop_margin", CROP_MARGIN)
    if type(margin) not in (int, float) or not 1.0 <= margin <= 4.0:
        raise WeightsError(f"{path}: damaged deepscan metadata, field 'preprocessing' needs a crop_margin between "
                           f"1 and 4, not {margin!r}")
    if pre.get("alignment", "none") not in ALIGNMENTS:
        raise WeightsError(f"{path}: preprocessing alignment {pre.get('alignment')!r} is not one this deepscan knows "
                           f"({', '.join(ALIGNMENTS)}); upgrade deepscan")
    for key in ("mean", "std"):  # the normaliser uses the config's: a file that says otherwise is damaged
        if key in pre and pre[key] != list(getattr(cfg, key)):
            raise WeightsError(f"{path}: damaged deepscan metadata, preprocessing {key} {pre[key]!r} differs from "
                               f"the config's {list(getattr(cfg, key))}")
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


_FLOATS = {"F32", "F16", "BF16", "F64"}


def check_tensors(path: Path, cfg: ModelConfig) -> None:
    """The weights the header announces must be exactly those of ``cfg``'s model, in a float type:
    checked from the header alone, before anything is allocated."""
    import torch

    from .model import LDADetector

    with torch.device("meta"):
        state = LDADetector(cfg).state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    with safe_open(str(path), framework="pt") as f:
        got = {}
        for key in f.keys():
            if key.startswith("model."):
                sl = f.get_slice(key)
                got[key[6:]] = (tuple(sl.get_shape()), sl.get_dtype())
    missing = sorted(set(expected) - set(got))
    if missing:
        raise WeightsError(f"{path}: tensor model.{missing[0]} is missing ({len(missing)} missing in all) for the "
                           f"{cfg.variant} config it describes; the file is damaged or not from this deepscan")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise WeightsError(f"{path}: unexpected tensor model.{extra[0]} ({len(extra)} in all) for its {cfg.variant} config")
    for key, shape in expected.items():
        have, dtype = got[key]
        if have != shape:
            raise WeightsError(f"{path}: tensor model.{key} has shape {list(have)}, its config needs {list(shape)}")
        if state[key].is_floating_point() and dtype not in _FLOATS:
            raise WeightsError(f"{path}: tensor model.{key} is {dtype}, not floating point")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LDADetector, CheckpointInfo]:
    """Rebuild the model from the file alone, weights loaded strictly, in eval mode. Half-precision
    files (fp16/bf16) are cast to fp32; non-finite weights (a diverged run) are refused."""
    import torch

    from .model import LDADetector

    info = read_info(path)
    check_tensors(Path(path), info.config)
    model = LDADetector(info.config)
    state = load_tensors(path, "model.")
    for key, t in state.items():
        if t.is_floating_point() and t.dtype != torch.float32:
            state[key] = t.float()
        if not torch.isfinite(state[key]).all():
            raise WeightsError(f"{path}: tensor model.{key} holds NaN or infinite values (a training run that "
                               "diverged?); use an earlier checkpoint")
    try:
        model.load_state_dict(state, strict=True, assign=True)  # use the loaded tensors: no second copy
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsError(f"{path}: weights do not match the {info.variant} config ({first})") from None
    return model.to(device).eval(), info
