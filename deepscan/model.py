"""The spatial-temporal long-distance-attention detector (Lu et al., TNNLS 2023, section IV).

One code path serves the four variants of Table VII: an Xception backbone (timm's
``legacy_xception`` architecture, randomly initialised as in paper V-A) whose conv2 output is
recalibrated by the spatial LDA component and whose block1 output is recalibrated by the
temporal LDA component, each switched on by the config.

Inputs, both already normalised with the config's mean/std:
  image   (B, 3, S, S)        frame t at the backbone size (398)
  frames  (B, T, 3, s, s)     frames t..t+T-1 at the LDA size (224); T = config.clip_len.
                              The spatial component reads frames[:, 0]; the temporal one the
                              frame and its T-1 motion residuals r^k = I^(k+1) - I^k (eq. 1).
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import ConfigError


class LongDistanceAttention(nn.Module):
    """Patch tokens -> K latent-space activations per patch -> m attention maps (Fig. 5).

    ``num_inputs`` images (1 for the spatial component; the frame plus n-1 residuals for the
    temporal one) each get their own 16x16 patch projection, shaped like ViT-B/16's
    ``patch_embed.proj`` so pretrained weights load into it. All tokens form one sequence with a
    learned position embedding over (input, patch). In each latent space k the tokens are
    mapped by U_k (D x d) and consulted by the template t_k: a = sigmoid(<x, t_k> / sqrt(d)).
    Activations of the same patch at different times are averaged to one map per space
    (SPEC §1), and a 1x1 convolution combines the K maps into m.
    """

    def __init__(self, cfg: ModelConfig, num_inputs: int):
        super().__init__()
        self.num_inputs = num_inputs
        self.grid = cfg.grid
        self.latent_dim = cfg.latent_dim
        num_patches = cfg.grid * cfg.grid
        self.patch_embed = nn.ModuleList(
            nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            for _ in range(num_inputs)
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, num_inputs * num_patches, cfg.embed_dim))
        self.proj = nn.Parameter(torch.empty(cfg.num_spaces, cfg.embed_dim, cfg.latent_dim))  # U_k
        self.templates = nn.Parameter(torch.empty(cfg.num_spaces, cfg.latent_dim))  # t_k
        self.combine = nn.Conv2d(cfg.num_spaces, cfg.num_maps, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # as ViT
        nn.init.normal_(self.proj, std=1.0 / math.sqrt(self.proj.shape[1]))
        nn.init.normal_(self.templates, std=1.0)
        # Start as the plain mean of the K maps, so initial maps stay in (0, 1).
        nn.init.constant_(self.combine.weight, 1.0 / self.combine.in_channels)
        nn.init.zeros_(self.combine.bias)

    def activations(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, s, s) -> per-space patch activations (B, K, grid, grid) in (0, 1)."""
        b, t = inputs.shape[:2]
        if t != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} LDA inputs, got {t}")
        tokens = torch.cat(
            [embed(inputs[:, i]).flatten(2).transpose(1, 2) for i, embed in enumerate(self.patch_embed)],
            dim=1,
        )  # (B, T*N, D)
        z = tokens + self.pos_embed
        x = torch.einsum("bnd,kde->bkne", z, self.proj)  # representations X_k = Z U_k
        act = torch.sigmoid(torch.einsum("bkne,ke->bkn", x, self.templates) / math.sqrt(self.latent_dim))
        act = act.view(b, act.shape[1], t, self.grid * self.grid).mean(dim=2)  # reduce over time
        return act.view(b, -1, self.grid, self.grid)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, s, s) -> m attention maps (B, m, grid, grid)."""
        return self.combine(self.activations(inputs))


def recalibrate(features: torch.Tensor, maps: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Scale each channel group of ``features`` by its attention map (paper IV-B, last step).

    Map j scales channels [j*C/m, (j+1)*C/m); when m does not divide C (m = 3 or 5 in
    Table IX) the groups differ in size by one channel. "exact" expands every patch value over
    its block of the feature map (nearest, integer factor: 14 on 196, 7 on 98); "adaptive"
    stretches the map with adaptive average pooling (paper VI-D, other resolutions).
    """
    b, channels, h, w = features.shape
    group = torch.arange(channels, device=features.device) * maps.shape[1] // channels
    if cfg.map_fit == "exact":
        gh, gw = maps.shape[-2:]
        if h % gh or w % gw:
            raise ConfigError(f"feature map {(h, w)} is not a multiple of the attention grid")
        # One value per channel and patch, broadcast over the patch's block of the feature map:
        # the full-size scale tensor is never built, and either memory layout stays as it is.
        scale = maps.index_select(1, group).to(features.dtype)  # (B, C, gh, gw)
        if cfg.recalibration == "residual":
            scale = 1 + scale
        if not features.is_contiguous() and features.is_contiguous(memory_format=torch.channels_last):
            scale = scale.contiguous(memory_format=torch.channels_last)  # channels innermost, as features
        scale = scale[:, :, :, None, :, None]
        blocks = features.unflatten(3, (gw, w // gw)).unflatten(2, (gh, h // gh))  # (B, C, gh, fh, gw, fw)
        # Without autograd the features are scaled in place: a fresh 40 MB tensor per batch cost
        # more than the multiplication (27 ms vs 3 ms, bf16, batch 8, 64 x 196 x 196).
        out = blocks.mul_(scale) if not torch.is_grad_enabled() else blocks * scale
        return out.reshape(b, channels, h, w)
    scale = F.adaptive_avg_pool2d(maps, (h, w)).index_select(1, group).to(features.dtype)
    return features * (1 + scale) if cfg.recalibration == "residual" else features * scale


class LDADetector(nn.Module):
    """Xception with spatial and/or temporal long-distance attention; 2-class logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Architecture only: paper V-A initialises the backbone randomly, and nothing here
        # may download weights.
        self.backbone = timm.create_model("legacy_xception", pretrained=False, num_classes=cfg.num_classes)
        self.spatial = LongDistanceAttention(cfg, 1) if cfg.spatial else None
        self.temporal = LongDistanceAttention(cfg, cfg.num_frames) if cfg.temporal else None

    def attention_maps(self, frames: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The m maps of each enabled component, (B, m, 14, 14) each."""
        maps: dict[str, torch.Tensor] = {}
        if self.spatial is None and self.temporal is None:
            return maps
        cfg = self.config
        if frames is None or frames.dim() != 5 or frames.shape[1] < cfg.clip_len:
            shape = None if frames is None else tuple(frames.shape)
            raise ValueError(f"{cfg.variant} needs frames of shape (B, {cfg.clip_len}, 3, {cfg.lda_size}, {cfg.lda_size}), got {shape}")
        # The LDA components stay in fp32 under autocast: they cost ~3 % of the MACs, and their
        # sigmoid activations and residual inputs are where bf16 rounding moved scores most.
        with torch.autocast(frames.device.type, enabled=False):
            frames = frames.float()
            if self.spatial is not None:
                maps["spatial"] = self.spatial(frames[:, :1])
            if self.temporal is not None:
                clip = frames[:, : cfg.num_frames]
                residuals = clip[:, 1:] - clip[:, :-1]  # r^k = I^(k+1) - I^k, eq. (1)
                maps["temporal"] = self.temporal(torch.cat([clip[:, :1], residuals], dim=1))
        return maps

    def forward(self, image: torch.Tensor, frames: torch.Tensor | None = None, return_maps: bool = False):
        maps = self.attention_maps(frames)
        b = self.backbone
        x = b.act1(b.bn1(b.conv1(image)))
        x = b.act2(b.bn2(b.conv2(x)))
        if "spatial" in maps:  # shallow features (paper IV-C)
            x = recalibrate(x, maps["spatial"], self.config)
        x = b.block1(x)
        if "temporal" in maps:  # mid-level features (paper IV-D)
            x = recalibrate(x, maps["temporal"], self.config)
        for name in ("block2", "block3", "block4", "block5", "block6", "block7",
                     "block8", "block9", "block10", "block11", "block12"):
            x = getattr(b, name)(x)
        x = b.act3(b.bn3(b.conv3(x)))
        x = b.act4(b.bn4(b.conv4(x)))
        logits = b.forward_head(x)
        return (logits, maps) if return_maps else logits


def input_normaliser(cfg: ModelConfig, device: torch.device, pin: bool = True):
    """A function from uint8 RGB crops (..., H, W, 3), numpy or torch, to normalised channels_last
    float tensors (..., 3, H, W) on ``device``, with the config's mean/std. With ``pin``, host
    memory is pinned on CUDA so the copy can overlap with compute (a caller that stages its
    batches in pinned buffers of its own passes ``pin=False``)."""
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255

    def to_input(batch) -> torch.Tensor:
        t = torch.from_numpy(batch) if not isinstance(batch, torch.Tensor) else batch
        lead = t.shape[:-3]
        t = t.reshape(-1, *t.shape[-3:])
        if pin and device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        x = t.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        return x.view(*lead, *x.shape[1:]) if len(lead) > 1 else x

    return to_input


def load_vit_embeddings(model: LDADetector, vit_state: dict[str, torch.Tensor]) -> list[str]:
    """Copy ViT-B/16's patch projection and position embedding into every LDA component.

    ``vit_state`` is a timm ViT state dict (``patch_embed.proj.weight/bias``, ``pos_embed``
    with one class token). Each of a component's projections gets the same pretrained weights;
    the spatial position table is repeated over time for the temporal component. Returns
    the names of the tensors it set.
    """
    weight, bias = vit_state["patch_embed.proj.weight"], vit_state["patch_embed.proj.bias"]
    pos = vit_state["pos_embed"]
    loaded = []
    for comp_name in ("spatial", "temporal"):
        comp = getattr(model, comp_name)
        if comp is None:
            continue
        n = comp.grid * comp.grid
        table = pos[:, -n:]  # drop the class token
        if weight.shape != comp.patch_embed[0].weight.shape or table.shape[-1] != comp.pos_embed.shape[-1]:
            raise ConfigError(
                f"ViT weights {tuple(weight.shape)} do not fit the {comp_name} patch embedding "
                f"{tuple(comp.patch_embed[0].weight.shape)}"
            )
        with torch.no_grad():
            for i, embed in enumerate(comp.patch_embed):
                embed.weight.copy_(weight)
                embed.bias.copy_(bias)
                loaded += [f"{comp_name}.patch_embed.{i}.weight", f"{comp_name}.patch_embed.{i}.bias"]
            comp.pos_embed.copy_(table.repeat(1, comp.num_inputs, 1))
            loaded.append(f"{comp_name}.pos_embed")
    return loaded


# ---------------------------------------------------------------------------- inference fast path
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv computing bn(conv(x)) with the batch norm's running statistics (eval mode)."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
    channels_last = not conv.weight.is_contiguous() and conv.weight.is_contiguous(memory_format=torch.channels_last)
    return fused.to(memory_format=torch.channels_last) if channels_last else fused


def fold_batchnorm(model: LDADetector) -> LDADetector:
    """Fold every batch norm of the backbone into the convolution feeding it, in place, for
    inference: 40 fewer passes over the feature maps (about +8 % clips/s on a CPU with bf16).
    Only pairs where the forward pass applies the batch norm directly to the convolution's output
    are folded (stem, skip paths, each separable conv's pointwise conv); the model is put in eval
    mode and must not be trained afterwards. Calling it twice is harmless."""
    model.eval()
    b = model.backbone

    def pointwise(module: nn.Module, attr: str) -> tuple[nn.Module, str]:
        conv = getattr(module, attr)
        return (conv, "pointwise") if hasattr(conv, "pointwise") else (module, attr)

    pairs: list[tuple[nn.Module, str, nn.Module, str]] = []  # (conv owner, conv name, bn owner, bn name)
    for conv_attr, bn_attr in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv4", "bn4")):
        pairs.append((*pointwise(b, conv_attr), b, bn_attr))
    for block in b.modules():
        if getattr(block, "skip", None) is not None and hasattr(block, "skipbn"):
            pairs.append((block, "skip", block, "skipbn"))
        if isinstance(getattr(block, "rep", None), nn.Sequential):
            layers = list(block.rep.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(layers, layers[1:]):
                if isinstance(bn, nn.BatchNorm2d):
                    pairs.append((*pointwise(block.rep, conv_name), block.rep, bn_name))
    for conv_owner, conv_name, bn_owner, bn_name in pairs:
        conv, bn = getattr(conv_owner, conv_name), getattr(bn_owner, bn_name)
        if not isinstance(bn, nn.BatchNorm2d):
            continue  # folded already
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"cannot fold {bn_name}: it follows a {type(conv).__name__}, not a Conv2d")
        setattr(conv_owner, conv_name, _fold(conv, bn))
        setattr(bn_owner, bn_name, nn.Identity())
    return model
