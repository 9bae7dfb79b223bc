"""A synthetic DeepfakeBench Xception checkpoint: the exact layout of its ``xception_best.pth``
(283 tensors: ``backbone.*`` with timm legacy_xception's names, the head ``last_linear``, the
unused ``adjust_channel``), random values, written with ``torch.save`` as DeepfakeBench does."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch


def state_dict(seed: int = 0, *, pointwise_2d: bool = False) -> OrderedDict:
    torch.manual_seed(seed)
    net = timm.create_model("legacy_xception", pretrained=False, num_classes=2)
    for m in net.modules():  # batch norm statistics that are not the identity, so they matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
            m.num_batches_tracked.fill_(1234)
    out = OrderedDict()
    for k, v in net.state_dict().items():
        k = "last_linear." + k[3:] if k.startswith("fc.") else k
        if pointwise_2d and k.endswith("pointwise.weight"):
            v = v[:, :, 0, 0]
        out["backbone." + k] = v.clone()
    # adjust_channel: Conv2d(2048, 512, 1, 1) + BatchNorm2d(512) + ReLU, registered after last_linear
    out["backbone.adjust_channel.0.weight"] = torch.randn(512, 2048, 1, 1) * 0.01
    out["backbone.adjust_channel.0.bias"] = torch.zeros(512)
    out["backbone.adjust_channel.1.weight"] = torch.ones(512)
    out["backbone.adjust_channel.1.bias"] = torch.zeros(512)
    out["backbone.adjust_channel.1.running_mean"] = torch.zeros(512)
    out["backbone.adjust_channel.1.running_var"] = torch.ones(512)
    out["backbone.adjust_channel.1.num_batches_tracked"] = torch.tensor(0)
    return out


def write(path: Path, state: dict | None = None, **kw) -> Path:
    torch.save(state if state is not None else state_dict(**kw), path)
    return path


def timm_reference(state: dict) -> torch.nn.Module:
    """timm's legacy_xception holding ``state`` directly: what the converted model must equal."""
    net = timm.create_model("legacy_xception", pretrained=False, num_classes=2)
    own = {}
    for k, v in state.items():
        k = k.removeprefix("backbone.")
        if k.startswith("adjust_channel."):
            continue
        k = "fc." + k[len("last_linear."):] if k.startswith("last_linear.") else k
        own[k] = v[:, :, None, None] if k.endswith("pointwise.weight") and v.dim() == 2 else v
    net.load_state_dict(own, strict=True)
    return net.eval()
