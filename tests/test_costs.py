from deepscan.config import config_for_variant
from deepscan.costs import PAPER_COSTS, measure


def test_xception_macs_match_paper_within_one_percent():
    cost = measure(config_for_variant("xception"))
    assert abs(cost.gmacs - PAPER_COSTS["xception"][0]) / PAPER_COSTS["xception"][0] < 0.01
    assert cost.params == 20_811_050  # timm legacy_xception, 2-class head


def test_spatial_increment_decomposes_as_spec_says():
    base = measure(config_for_variant("xception"))
    cost = measure(config_for_variant("spatial"))
    parts = cost.parts
    assert parts["patch_projections"] == 16 * 16 * 3 * 768 + 768
    assert parts["position_embeddings"] == 196 * 768
    assert parts["latent_spaces_U_t"] == 12 * 768 * 5 + 12 * 5
    assert parts["combine_1x1"] == 12 * 4 + 4
    assert cost.params - base.params == sum(parts.values())
    # the paper's +0.79 M over the backbone, to two decimals
    assert round((cost.params - base.params) / 1e6, 2) == 0.79
    assert cost.macs > base.macs
