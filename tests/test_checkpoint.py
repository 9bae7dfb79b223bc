import pickle

import pytest
import torch

from deepscan.checkpoint import load_checkpoint, read_info, save_checkpoint
from deepscan.errors import WeightsError

from .conftest import tiny_model


@pytest.mark.parametrize("variant", ["xception", "spatial-temporal"])
def test_round_trip_reproduces_outputs_bit_for_bit(tmp_path, variant):
    model = tiny_model(variant, seed=3)
    path = save_checkpoint(model, tmp_path / "m.safetensors", untrained=True, provenance={"epochs": 0})
    loaded, info = load_checkpoint(path)
    assert info.variant == variant and info.untrained
    assert info.config == model.config
    assert info.preprocessing["image_size"] == 62 and info.preprocessing["clip_len"] == model.config.clip_len
    assert info.provenance["epochs"] == 0 and "created" in info.provenance
    cfg = model.config
    torch.manual_seed(1)
    image = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    frames = torch.randn(2, cfg.clip_len, 3, cfg.lda_size, cfg.lda_size)
    with torch.no_grad():
        assert torch.equal(model(image, frames), loaded(image, frames))


def test_pickle_file_is_refused_without_being_executed(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WeightsError, match="never unpickles"):
        load_checkpoint(bad)
    renamed = tmp_path / "model.safetensors"
    renamed.write_bytes(bad.read_bytes())
    with pytest.raises(WeightsError, match="never unpickles"):
        read_info(renamed)
    assert not marker.exists()


def test_foreign_and_damaged_files(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(WeightsError, match="not a deepscan checkpoint"):
        read_info(plain)
    with pytest.raises(WeightsError, match="not found"):
        read_info(tmp_path / "missing.safetensors")
    good = save_checkpoint(tiny_model("spatial"), tmp_path / "g.safetensors", untrained=False)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(WeightsError):
        load_checkpoint(cut)
