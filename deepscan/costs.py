"""Parameters and multiply-accumulates of each variant, beside the paper's Table VII.

Convention (the paper's "Flops", as fvcore counts them): convolutions and matrix products as
multiply-accumulates (torch.utils.flop_counter's FLOPs / 2), plus 2 per element for every
batch norm in eval mode (scale and shift) and 1 per input element for adaptive average
pooling. Element-wise products, activations and additions are not counted. Under this
convention timm's legacy_xception at 398x398 costs 14.60 GMACs; flop_counter alone gives 14.53.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import VARIANTS, ModelConfig, config_for_variant
from .model import LDADetector

# Table VII of the paper: GMACs ("Flops (G)") and parameters (M) at 398x398.
PAPER_COSTS = {
    "xception": (14.60, 22.38),
    "spatial": (14.92, 23.17),
    "temporal": (15.41, 24.74),
    "spatial-temporal": (15.82, 25.57),
}


@dataclass(frozen=True)
class Cost:
    variant: str
    params: int
    macs: int
    parts: dict  # LDA parameter breakdown: name -> count

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def to_json(self) -> dict:
        paper_g, paper_p = PAPER_COSTS[self.variant]
        return {
            "variant": self.variant,
            "params_m": round(self.params_m, 4),
            "gmacs": round(self.gmacs, 4),
            "paper_params_m": paper_p,
            "paper_gmacs": paper_g,
            "lda_params": self.parts,
        }


def count_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs of one forward pass under the paper's (fvcore) convention, see module docstring."""
    extra = [0]

    def bn_hook(_mod, _inp, out):
        extra[0] += 2 * out.numel()

    def pool_hook(_mod, inp, _out):
        extra[0] += inp[0].numel()

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            hooks.append(mod.register_forward_hook(bn_hook))
        elif isinstance(mod, (nn.AdaptiveAvgPool2d,)):
            hooks.append(mod.register_forward_hook(pool_hook))
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return counter.get_total_flops() // 2 + extra[0]


def lda_parts(model: LDADetector) -> dict:
    """Parameters the LDA components add, by kind (SPEC §1 asks for this breakdown)."""
    parts = {"patch_projections": 0, "position_embeddings": 0, "latent_spaces_U_t": 0, "combine_1x1": 0}
    for comp in (model.spatial, model.temporal):
        if comp is None:
            continue
        parts["patch_projections"] += sum(p.numel() for p in comp.patch_embed.parameters())
        parts["position_embeddings"] += comp.pos_embed.numel()
        parts["latent_spaces_U_t"] += comp.proj.numel() + comp.templates.numel()
        parts["combine_1x1"] += sum(p.numel() for p in comp.combine.parameters())
    return parts


def example_inputs(cfg: ModelConfig, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    image = torch.zeros(batch, 3, cfg.image_size, cfg.image_size)
    if cfg.variant == "xception":
        return image, None
    return image, torch.zeros(batch, cfg.clip_len, 3, cfg.lda_size, cfg.lda_size)


def measure(cfg: ModelConfig) -> Cost:
    model = LDADetector(cfg)
    params = sum(p.numel() for p in model.parameters())
    return Cost(cfg.variant, params, count_macs(model, *example_inputs(cfg)), lda_parts(model))


def measure_all(image_size: int = 398, lda_size: int = 224) -> list[Cost]:
    return [measure(config_for_variant(v, image_size=image_size, lda_size=lda_size)) for v in VARIANTS]
