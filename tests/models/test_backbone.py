"""timm-style checks for every model config: shape, finite output, gradient on every parameter."""

from importlib import resources

import pytest
import torch
from omegaconf import OmegaConf

from cellrep.errors import CellrepError
from cellrep.models.backbone import build_backbone

# The large rungs of the ViT ladder take minutes and gigabytes at full width on a CPU; they are
# checked at tiny width (and at full width on the meta device) in tests/models/test_vit_ladder.py.
TOO_LARGE_FOR_CPU = {"vit_l16.yaml", "vit_l8.yaml", "vit_g8.yaml", "ca_vit_l16.yaml", "ca_vit_l8.yaml"}
MODEL_CONFIGS = sorted(
    p.name
    for p in (resources.files("cellrep") / "conf" / "model").iterdir()
    if p.name.endswith(".yaml") and p.name not in TOO_LARGE_FOR_CPU
)


@pytest.mark.parametrize("config", MODEL_CONFIGS)
@pytest.mark.parametrize("in_chans", [5, 6])
def test_model_config_builds_for_any_channel_count(config, in_chans):
    cfg = OmegaConf.load(resources.files("cellrep") / "conf" / "model" / config)
    torch.manual_seed(0)
    model = build_backbone(cfg.name, in_chans=in_chans, num_classes=7, img_size=32)
    x = torch.randn(2, in_chans, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(CellrepError, match="did you mean"):
        build_backbone("vit_smal_patch16_224", in_chans=6)
