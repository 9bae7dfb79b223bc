"""The model converted for OpenVINO (torch's side of ``score_openvino``): the loaded checkpoint,
batch norms folded as the torch runner runs it, traced by ``openvino.convert_model`` with uint8
crops as inputs (normalisation inside the graph) and P(fake) and every attention map as outputs.

Only a scan that converts (the first per checkpoint and OpenVINO version) imports this module and
so torch; a scan with the converted model in its cache runs on OpenVINO alone."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..model import fold_batchnorm, input_normaliser


class Exported(nn.Module):
    """uint8 crops in (normalised as the torch runner does, ``model.input_normaliser``), P(fake)
    and the attention maps (sorted by name) out."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names
        self.temporal = model.config.variant != "xception"
        self.norm = input_normaliser(model.config, torch.device("cpu"))

    def forward(self, image: torch.Tensor, frames: torch.Tensor | None = None):
        logits, maps = self.model(self.norm(image), self.norm(frames) if self.temporal else None, return_maps=True)
        return (torch.softmax(logits.float(), dim=1)[:, 1], *[maps[k] for k in self.names])


def convert(model: nn.Module, shapes: dict[str, list[int]], ov):
    """(OpenVINO's model of ``model`` for inputs of ``shapes``, the names of its map outputs)."""
    model = fold_batchnorm(model).eval()
    names = sorted(k for k in ("spatial", "temporal") if getattr(model, k, None) is not None)
    example = tuple(torch.zeros(s, dtype=torch.uint8) for s in shapes.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python conditions it freezes
        converted = ov.convert_model(Exported(model, names).eval(), example_input=example)
    return converted, names
