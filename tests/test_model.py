import copy

import pytest
import torch

from deepscan.config import ModelConfig, config_for_variant, suggest_image_size
from deepscan.errors import ConfigError
from deepscan.model import LDADetector, fold_batchnorm, load_vit_embeddings, recalibrate

from .conftest import tiny_config, tiny_model


def test_paper_config_stage_sizes():
    cfg = ModelConfig()
    assert cfg.variant == "spatial-temporal" and cfg.clip_len == 3
    assert cfg.grid == 14
    assert cfg.spatial_feature_size == 196 and cfg.temporal_feature_size == 98


def test_backbone_feature_maps_at_398():
    model = LDADetector(config_for_variant("xception")).eval()
    b = model.backbone
    with torch.no_grad():
        x = b.act2(b.bn2(b.conv2(b.act1(b.bn1(b.conv1(torch.zeros(1, 3, 398, 398)))))))
        assert x.shape == (1, 64, 196, 196)
        assert b.block1(x).shape == (1, 128, 98, 98)


def test_full_size_attention_maps_are_14x14():
    model = LDADetector(ModelConfig())
    maps = model.attention_maps(torch.randn(2, 3, 3, 224, 224))
    assert set(maps) == {"spatial", "temporal"}
    assert maps["spatial"].shape == (2, 4, 14, 14) and maps["temporal"].shape == (2, 4, 14, 14)


@pytest.mark.parametrize("variant", ["xception", "spatial", "temporal", "spatial-temporal"])
def test_forward_backward_every_variant(variant):
    model = tiny_model(variant).train()
    cfg = model.config
    image = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    frames = torch.randn(2, cfg.clip_len, 3, cfg.lda_size, cfg.lda_size)
    logits, maps = model(image, frames, return_maps=True)
    assert logits.shape == (2, 2)
    assert set(maps) == {"xception": set(), "spatial": {"spatial"}, "temporal": {"temporal"},
                         "spatial-temporal": {"spatial", "temporal"}}[variant]
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        if name.startswith(("spatial.", "temporal.")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("m", [1, 3, 4, 5])
def test_num_maps_and_channel_groups(m):
    model = tiny_model("spatial", num_maps=m)
    maps = model.attention_maps(torch.randn(1, 1, 3, 32, 32))
    assert maps["spatial"].shape == (1, m, 2, 2)


def test_recalibrate_scales_each_channel_group_by_its_map_blockwise():
    cfg = tiny_config("spatial", num_maps=2)
    feats = torch.ones(1, 4, 28, 28)
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0, 0, 1] = 3.0  # map 0, top-right patch
    maps[0, 1, 1, 0] = 5.0  # map 1, bottom-left patch
    out = recalibrate(feats, maps, cfg)
    # channels 0-1 follow map 0, channels 2-3 follow map 1; each patch covers a 14x14 block
    assert torch.all(out[0, :2, :14, 14:] == 3) and out[0, :2].sum() == 3 * 2 * 14 * 14
    assert torch.all(out[0, 2:, 14:, :14] == 5) and out[0, 2:].sum() == 5 * 2 * 14 * 14
    residual = recalibrate(feats, maps, cfg.replace(recalibration="residual"))
    assert torch.allclose(residual, feats + out)



@pytest.mark.parametrize("m", [3, 4])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_recalibrate_matches_upsampled_maps_in_either_layout(m, layout):
    cfg = tiny_config("spatial", num_maps=m)
    feats = torch.randn(2, 10, 28, 42).contiguous(memory_format=layout).requires_grad_()
    maps = torch.rand(2, m, 2, 3)
    group = torch.arange(10) * m // 10  # m=3: groups of 4, 3, 3 channels
    reference = feats * torch.nn.functional.interpolate(maps, size=(28, 42), mode="nearest")[:, group]
    out = recalibrate(feats, maps, cfg)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=layout)
    out.sum().backward()
    torch.testing.assert_close(feats.grad, reference.detach() / feats.detach())
    with torch.inference_mode():  # in place, same values and layout
        inplace = recalibrate(feats.detach().clone(), maps, cfg)
    torch.testing.assert_close(inplace, reference.detach(), rtol=0, atol=0)
    assert inplace.is_contiguous(memory_format=layout)

def test_temporal_component_reads_motion_residuals():
    model = tiny_model("temporal")
    still = torch.randn(1, 1, 3, 32, 32).repeat(1, 3, 1, 1, 1)
    moving = still.clone()
    moving[:, 2] += 1.0
    a = model.attention_maps(still)["temporal"]
    b = model.attention_maps(moving)["temporal"]
    assert not torch.allclose(a, b)  # only the last frame changed: the residuals carry it


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="not a multiple of the 14x14 attention grid"):
        ModelConfig(image_size=299)
    assert ModelConfig(image_size=299, map_fit="adaptive").spatial_feature_size == 147
    with pytest.raises(ConfigError, match="lda_size"):
        ModelConfig(lda_size=230)
    with pytest.raises(ConfigError, match="num_frames >= 2"):
        ModelConfig(num_frames=1)
    with pytest.raises(ConfigError, match="unknown variant"):
        config_for_variant("transformer")
    with pytest.raises(ConfigError, match="unknown model config field"):
        ModelConfig.from_dict({"spatial": True, "bogus": 1})
    assert ModelConfig(num_frames=1, temporal=False).clip_len == 1
    assert suggest_image_size() == 398


def test_adaptive_map_fit_runs_at_other_resolutions():
    model = LDADetector(config_for_variant("spatial", image_size=99, lda_size=32, map_fit="adaptive"))
    assert model(torch.randn(1, 3, 99, 99), torch.randn(1, 1, 3, 32, 32)).shape == (1, 2)


def test_vit_embeddings_load_into_every_projection():
    model = tiny_model("spatial-temporal")
    vit = {
        "patch_embed.proj.weight": torch.randn(768, 3, 16, 16),
        "patch_embed.proj.bias": torch.randn(768),
        "pos_embed": torch.randn(1, 1 + 4, 768),
    }
    loaded = load_vit_embeddings(model, vit)
    assert len(loaded) == 2 * 1 + 1 + 2 * 3 + 1
    assert torch.equal(model.temporal.patch_embed[2].weight, vit["patch_embed.proj.weight"])
    assert torch.equal(model.temporal.pos_embed[:, 4:8], vit["pos_embed"][:, 1:])
    with pytest.raises(ConfigError):
        load_vit_embeddings(model, {**vit, "patch_embed.proj.weight": torch.randn(768, 3, 8, 8)})


def test_folding_batchnorm_keeps_outputs_and_maps():
    model = tiny_model("spatial-temporal", seed=3)
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    image = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=gen)
    frames = torch.randn(3, cfg.clip_len, 3, cfg.lda_size, cfg.lda_size, generator=gen)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:  # statistics of these inputs (activations stay alive through the depth) ...
        m.momentum = None
    with torch.no_grad():
        model.train()(image, frames)
    model.eval()
    for m in bns:  # ... and non-trivial affine parameters, as after training
        m.weight.data.uniform_(0.5, 1.5, generator=gen)
        m.bias.data.uniform_(-0.3, 0.3, generator=gen)
    finals = []  # the last feature maps, before pooling

    def run(m):
        hook = m.backbone.global_pool.register_forward_hook(lambda mod, i, o: finals.append(i[0]))
        out = m(image, frames, return_maps=True)
        hook.remove()
        return (*out, finals[-1])

    with torch.no_grad():
        ref_logits, ref_maps, ref_final = run(model)
        folded = fold_batchnorm(copy.deepcopy(model))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        fold_batchnorm(folded)  # idempotent
        logits, maps, final = run(folded)
    spread = (ref_final - ref_final.mean(0)).abs().max()  # across clips
    assert spread > 1e-3  # the clips' features differ, so the comparison means something
    assert (final - ref_final).abs().max() <= 1e-3 * spread
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for k in ref_maps:
        torch.testing.assert_close(maps[k], ref_maps[k])
