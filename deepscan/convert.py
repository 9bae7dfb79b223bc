"""Published checkpoints of other projects, turned into deepscan checkpoints.

DeepfakeBench (SCLBD/DeepfakeBench) publishes its detectors as ``torch.save`` pickles of a state
dict. Its Xception (``training/networks/xception.py``, ``mode: original``, no dropout) is timm's
``legacy_xception`` under other prefixes: keys ``backbone.*``, the head ``backbone.last_linear`` a
Linear(2048, 2), plus ``backbone.adjust_channel.*`` (a 1x1 conv and batch norm used only in its
``adjust_channel`` mode: dropped). deepscan's ``xception`` variant is exactly that backbone, so
the weights load strictly, unchanged but for names (and 2-D pointwise weights of older files,
given their 1x1 kernel dimensions).

A pickle can run code when it is read. It is read here only after its sha256 matched a pin (the
manifest's) or at a user's explicit request (``deepscan weights import``), and then only with
torch's restricted unpickler (``weights_only=True``), which admits tensors and plain containers and
refuses any other object before creating it. Anything but a flat mapping of names to tensors is
refused. Scans never read the pickle: they load the safetensors checkpoint written from it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .config import CROP_MARGIN, config_for_variant
from .errors import WeightsError

FORMATS = ("deepfakebench",)
# DeepfakeBench trained its Xception on 256 px aligned faces normalised with mean = std = 0.5
# (training/config/detector/xception.yaml); class 1 = fake, as deepscan's.
DEEPFAKEBENCH_SIZE = 256
_DROP = ("adjust_channel.",)
_PREFIXES = ("module.", "backbone.")


def read_tensor_pickle(path: str | os.PathLike) -> dict:
    """A ``torch.save`` file's state dict, through torch's tensors-only unpickler. Refused in one
    line: a file that is not a regular file, not a torch file, or holds anything but a mapping of
    names to tensors (the restricted unpickler refuses other objects without creating them)."""
    import pickle

    import torch

    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot be read ({exc.strerror}); pass an existing .pth file") from None
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{path}: not a regular file; pass the .pth file itself")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or ["refused"])[0]
        raise WeightsError(f"{path}: refused: the pickle holds something other than tensors ({first[:200]}); "
                           "nothing in it was run") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError, IndexError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{path}: not a readable torch.save file ({type(exc).__name__}: {first[:200]}); "
                           "download or copy it again") from None
    if isinstance(state, dict) and set(state) in ({"state_dict"}, {"model"}):
        state = next(iter(state.values()))  # some trainers nest the state dict once
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str):
            raise WeightsError(f"{path}: refused: a key {key!r} that is not a tensor name")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: refused: {key!r} holds a {type(value).__name__}, not a tensor "
                               "(only a state dict of tensors is converted)")
    return state


def map_deepfakebench(state: dict, path: str = "checkpoint") -> dict:
    """DeepfakeBench's Xception names -> timm legacy_xception's: strip ``module.``/``backbone.``,
    drop ``adjust_channel.*``, ``last_linear`` -> ``fc``, 2-D pointwise weights -> (out, in, 1, 1)."""
    out = {}
    for key, value in state.items():
        name = key
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.startswith(_DROP):
            continue
        if name.startswith("last_linear."):
            name = "fc." + name[len("last_linear."):]
        if name.endswith("pointwise.weight") and value.dim() == 2:
            value = value[:, :, None, None]
        if name in out:
            raise WeightsError(f"{path}: two tensors map to {name!r} (e.g. {key!r}); not a DeepfakeBench Xception")
        out[name] = value
    return out


def xception_from_deepfakebench(state: dict, path: str = "checkpoint"):
    """The deepscan ``xception`` model holding ``state`` (DeepfakeBench's layout), loaded strictly;
    a missing, unexpected or mis-shaped tensor, or a non-finite one, is a one-line refusal."""
    import torch

    from .model import LDADetector

    cfg = config_for_variant("xception", image_size=DEEPFAKEBENCH_SIZE)
    model = LDADetector(cfg)
    want = model.backbone.state_dict()
    got = map_deepfakebench(state, path)
    missing = sorted(set(want) - set(got))
    if missing:
        raise WeightsError(f"{path}: tensor backbone.{missing[0]} is missing ({len(missing)} missing in all); "
                           "not a DeepfakeBench Xception (mode: original) state dict")
    extra = sorted(set(got) - set(want))
    if extra:
        raise WeightsError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} in all); not a DeepfakeBench "
                           "Xception (mode: original) state dict")
    for key, ref in want.items():
        t = got[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise WeightsError(f"{path}: tensor {key} has shape {list(t.shape)}, the Xception needs {list(ref.shape)}")
        if ref.is_floating_point():
            if not t.is_floating_point():
                raise WeightsError(f"{path}: tensor {key} is {t.dtype}, not floating point")
            if not torch.isfinite(t).all():
                raise WeightsError(f"{path}: tensor {key} holds NaN or infinite values; refused")
        got[key] = t.to(ref.dtype)
    model.backbone.load_state_dict(got, strict=True)
    return model.eval()


def convert(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "deepfakebench",
            provenance: dict | None = None) -> Path:
    """Convert the pickle ``src`` (format ``fmt``) into the deepscan checkpoint ``out``, with its
    preprocessing (256 px, margin 1.3, mean/std 0.5, faces aligned on the landmarks) and
    ``provenance``. The caller has verified ``src``'s origin (a pinned sha256, or a user's file)."""
    from .checkpoint import save_checkpoint

    if fmt not in FORMATS:
        raise WeightsError(f"--from {fmt!r}: deepscan converts {', '.join(FORMATS)} checkpoints")
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise WeightsError(f"--out {out}: a deepscan checkpoint is a .safetensors file; name it e.g. xception.safetensors")
    model = xception_from_deepfakebench(read_tensor_pickle(src), str(src))
    prov = {"converted_from": fmt, "epochs": None, "init": "trained by DeepfakeBench",
            **(provenance or {})}
    return save_checkpoint(model, out, untrained=False, provenance=prov, crop_margin=CROP_MARGIN,
                           alignment="deepfakebench-5pt", dated=False)
