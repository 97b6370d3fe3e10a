"""trainer.strategy=fsdp: one FSDP unit per transformer / residual block (checked by running the wrap
policy on real models; FSDP itself needs GPUs)."""

import torch.nn as nn
from lightning.pytorch.strategies import FSDPStrategy
from timm.models.resnet import BasicBlock
from timm.models.vision_transformer import Block

from cellrep.models.backbone import build_backbone
from cellrep.models.mae import MaskedAutoencoder
from cellrep.training.strategy import trainer_strategy


def _units(strategy: FSDPStrategy, model: nn.Module) -> set[nn.Module]:
    policy = strategy.kwargs["auto_wrap_policy"]
    return set(policy._run_policy(model, set(), {})) - {model}  # modules FSDP would wrap, besides the root


def test_other_strategies_pass_through():
    assert trainer_strategy("ddp", nn.Linear(2, 2)) == "ddp" and trainer_strategy("auto", nn.Linear(2, 2)) == "auto"


def test_fsdp_wraps_each_block_of_an_mae_and_of_a_resnet():
    encoder = build_backbone(
        "ca_vit_small_patch16", in_chans=5, num_classes=0, img_size=32, embed_dim=64, depth=3, num_heads=4
    )
    mae = MaskedAutoencoder(encoder, 5, decoder_dim=32, decoder_depth=2, decoder_heads=4)
    strategy = trainer_strategy("fsdp", mae)
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    blocks = {m for m in mae.modules() if isinstance(m, Block)}
    assert len(blocks) == 3 + 2 and _units(strategy, mae) == blocks  # encoder + decoder blocks, nothing else

    resnet = build_backbone("resnet18", in_chans=3)
    units = _units(trainer_strategy("fsdp", resnet), resnet)
    assert len(units) == 8 and all(isinstance(m, BasicBlock) for m in units)


def test_fsdp_on_a_model_without_known_blocks_is_one_unit(caplog):
    strategy = trainer_strategy("fsdp", nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert strategy.kwargs.get("auto_wrap_policy") is None and "one FSDP unit" in caplog.text
