"""Model configuration: one frozen dataclass describes every variant.

The four variants of the paper (Table VII/VIII) differ only in which long-distance
attention (LDA) components are switched on; everything else is shared, so the variant
is derived from two booleans rather than stored as a free string.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

MIN_FACE = 24  # px in the frame; smaller faces are ignored
# what a folder scan takes as video (here, not in video.py: planning a scan loads no numpy)
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp",
                    # camera, disc and broadcast files
                    ".mts", ".m2ts", ".m2t", ".vob", ".mxf", ".ogv", ".3g2", ".f4v", ".asf", ".divx", ".y4m")

VARIANTS = ("xception", "spatial", "temporal", "spatial-temporal")
DEFAULT_VARIANT = "spatial-temporal"

# Inputs scaled to [-1, 1]: the statistics of FaceForensics++'s Xception and of timm's
# augreg ViT-B/16, whose patch embeddings we load. The paper does not say.
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
# Face crops: a square around the detector box, enlarged this much (common for FF++ crops). A
# preprocessing constant: it travels with every checkpoint, so crops are made the same way.
CROP_MARGIN = 1.3
# How faces are cut (travels with every checkpoint): "none", a square around the detector's box;
# "deepfakebench-5pt", a similarity transform of the landmarks onto DeepfakeBench's template
# (faces.align_template), as the published FF++ Xception was trained on.
ALIGNMENTS = ("none", "deepfakebench-5pt")


_INT_BOUNDS = {  # generous for research, small enough that nothing absurd is ever allocated
    "image_size": (32, 2048), "lda_size": (16, 1024), "patch_size": (1, 256), "embed_dim": (1, 4096),
    "num_spaces": (1, 256), "latent_dim": (1, 1024), "num_maps": (1, 256), "num_frames": (1, 32),
    "num_classes": (1, 1000),
}


def _conv2_size(image_size: int) -> int:
    """Side of legacy_xception's conv2 output: two unpadded 3x3 convs, the first stride 2."""
    return (image_size - 3) // 2 + 1 - 2


def _block1_size(image_size: int) -> int:
    """block1 halves conv2's map with a padded stride-2 pool: ceil(s / 2)."""
    return (_conv2_size(image_size) + 1) // 2


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved inside every checkpoint."""

    spatial: bool = True  # spatial LDA on conv2's output (paper IV-C)
    temporal: bool = True  # temporal LDA on block1's output (paper IV-D)
    image_size: int = 398  # backbone input; 398 makes conv2 196 = 14 * 14 (paper VI-D)
    lda_size: int = 224  # LDA input, fixed by ViT-B/16's pretrained embeddings (paper VI-D)
    patch_size: int = 16  # paper V-A
    embed_dim: int = 768  # ViT-B/16's D, so patch/position embeddings can load from it
    num_spaces: int = 12  # K latent forgery-property spaces (paper IV-B: "12 such modules")
    latent_dim: int = 5  # d; not given by the paper, bounded by Table VII's +0.79 M (SPEC §1)
    num_maps: int = 4  # m attention maps after the 1x1 conv (paper Table IX)
    num_frames: int = 3  # n consecutive frames for the temporal component (paper Table X)
    num_classes: int = 2  # real / fake; P(fake) = softmax[1]
    # How an attention map scales features: "multiply" is the paper's f * a,
    # "residual" is f * (1 + a), which keeps the signal alive when a is near 0.
    recalibration: str = "multiply"
    # How a 14x14 map meets a feature map: "exact" requires an integer multiple and repeats
    # each patch value over its block (the paper at 398); "adaptive" stretches the map with
    # adaptive average pooling, as the paper does for other resolutions (section VI-D).
    map_fit: str = "exact"
    mean: tuple[float, float, float] = INPUT_MEAN
    std: tuple[float, float, float] = INPUT_STD

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values -------------------------------------------------------------
    @property
    def variant(self) -> str:
        if self.spatial and self.temporal:
            return "spatial-temporal"
        if self.spatial:
            return "spatial"
        if self.temporal:
            return "temporal"
        return "xception"

    @property
    def grid(self) -> int:
        """Side of the patch grid: 224 / 16 = 14."""
        return self.lda_size // self.patch_size

    @property
    def clip_len(self) -> int:
        """Frames one prediction consumes: n for temporal variants, else 1."""
        return self.num_frames if self.temporal else 1

    @property
    def spatial_feature_size(self) -> int:
        return _conv2_size(self.image_size)

    @property
    def temporal_feature_size(self) -> int:
        return _block1_size(self.image_size)

    # ---- validation -----------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"invalid model config: {msg}")

        # Types and bounds first: a config may come from any file (a checkpoint's metadata), and
        # absurd sizes must fail here, in one line, not as a 9 GB allocation.
        for name, (lo, hi) in _INT_BOUNDS.items():
            v = getattr(self, name)
            if type(v) is not int:
                bad(f"{name} must be an integer, not {v!r}")
            if not lo <= v <= hi:
                bad(f"{name} must be between {lo} and {hi}, got {v}")
        for name in ("spatial", "temporal"):
            if type(getattr(self, name)) is not bool:
                bad(f"{name} must be true or false, not {getattr(self, name)!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if not (isinstance(v, tuple) and len(v) == 3 and all(type(x) in (int, float) and math.isfinite(x) for x in v)):
                bad(f"{name} must be 3 finite numbers (R, G, B), not {v!r}")
        if min(self.std) <= 0:
            bad(f"std must be > 0 for every channel, got {list(self.std)}")
        if self.num_classes != 2:
            bad(f"num_classes must be 2 (real, fake), got {self.num_classes}")
        if self.recalibration not in ("multiply", "residual"):
            bad(f"recalibration must be 'multiply' or 'residual', not {self.recalibration!r}")
        if self.map_fit not in ("exact", "adaptive"):
            bad(f"map_fit must be 'exact' or 'adaptive', not {self.map_fit!r}")
        for name in ("patch_size", "embed_dim", "num_spaces", "latent_dim", "num_maps", "num_classes"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32:
            bad(f"image_size {self.image_size} is too small for Xception (minimum 32)")
        if self.lda_size % self.patch_size:
            bad(f"lda_size {self.lda_size} is not a multiple of patch_size {self.patch_size}")
        if self.temporal and self.num_frames < 2:
            bad(f"the temporal component needs num_frames >= 2 (a frame and one residual), got {self.num_frames}")
        if self.num_frames < 1:
            bad(f"num_frames must be >= 1, got {self.num_frames}")
        checks = []
        if self.spatial:
            checks.append(("spatial", "conv2", self.spatial_feature_size, 64))
        if self.temporal:
            checks.append(("temporal", "block1", self.temporal_feature_size, 128))
        for comp, stage, size, channels in checks:
            if self.num_maps > channels:
                bad(f"num_maps {self.num_maps} exceeds the {channels} channels of {stage}")
            if self.map_fit == "exact" and size % self.grid:
                bad(
                    f"image_size {self.image_size} gives a {size}x{size} {stage} map for the {comp} "
                    f"component, not a multiple of the {self.grid}x{self.grid} attention grid; "
                    f"use image_size {suggest_image_size(self.grid)} or map_fit='adaptive' (paper VI-D)"
                )

    # ---- (de)serialisation ----------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be an object, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                v = d[key]
                d[key] = tuple(v) if isinstance(v, (list, tuple)) else v  # validate() names a bad value
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def suggest_image_size(grid: int = 14) -> int:
    """Smallest image size >= 398 whose conv2 and block1 maps are both multiples of grid."""
    size = 398
    while _conv2_size(size) % grid or _block1_size(size) % grid:
        size += 1
    return size


def config_for_variant(variant: str, **overrides) -> ModelConfig:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    spatial = variant in ("spatial", "spatial-temporal")
    temporal = variant in ("temporal", "spatial-temporal")
    return ModelConfig(spatial=spatial, temporal=temporal, **overrides)
