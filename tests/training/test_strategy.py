"""trainer.strategy=fsdp: FSDP2 with one unit per transformer / residual block, checked by sharding real
models in a one-process gloo group (tests/cli/test_fsdp_train.py trains with 2 processes)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from timm.models.resnet import BasicBlock
from timm.models.vision_transformer import Block
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from cellrep.errors import CellrepError
from cellrep.models.backbone import build_backbone
from cellrep.models.mae import MaskedAutoencoder
from cellrep.training.strategy import FSDPStrategy, shard_blocks, trainer_strategy


class Task(nn.Module):
    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self._device_mesh = None


@pytest.fixture
def mesh(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield {"data_parallel": init_device_mesh("cpu", (1,))}
    finally:
        dist.destroy_process_group()


def test_other_strategies_pass_through_and_fsdp_keeps_full_checkpoints():
    assert trainer_strategy("ddp") == "ddp" and trainer_strategy("auto") == "auto"
    strategy = trainer_strategy("fsdp")
    assert isinstance(strategy, FSDPStrategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy._save_distributed_checkpoint is False and strategy._tensor_parallel_size == 1


def test_shard_blocks_is_a_no_op_without_a_device_mesh():
    task = Task(backbone=build_backbone("resnet18", in_chans=3))
    shard_blocks(task)
    assert not any(isinstance(m, FSDPModule) for m in task.modules())


def test_fsdp_units_are_the_blocks_and_the_top_level_modules(mesh):
    encoder = build_backbone(
        "ca_vit_small_patch16", in_chans=5, num_classes=0, img_size=32, embed_dim=64, depth=3, num_heads=4
    )
    task = Task(mae=MaskedAutoencoder(encoder, 5, decoder_dim=32, decoder_depth=2, decoder_heads=4))
    task._device_mesh = mesh
    shard_blocks(task)
    units = {m for m in task.modules() if isinstance(m, FSDPModule)}
    blocks = {m for m in task.modules() if isinstance(m, Block)}
    assert len(blocks) == 3 + 2 and units == blocks | {task.mae}  # encoder + decoder blocks, then the MAE
    shard_blocks(task)  # Lightning calls configure_model again for test: nothing changes
    assert {m for m in task.modules() if isinstance(m, FSDPModule)} == units

    resnet = Task(backbone=build_backbone("resnet18", in_chans=3))
    resnet._device_mesh = mesh
    shard_blocks(resnet)
    units = {m for m in resnet.modules() if isinstance(m, FSDPModule)} - {resnet.backbone}
    assert len(units) == 8 and all(isinstance(m, BasicBlock) for m in units)
    out = resnet.backbone.forward_features(torch.randn(2, 3, 32, 32))  # a registered method gathers the weights
    assert out.shape[:2] == (2, 512)


def test_a_parameter_outside_every_unit_is_refused(mesh):
    task = Task(backbone=build_backbone("resnet18", in_chans=3))
    task.scale = nn.Parameter(torch.ones(1))
    task._device_mesh = mesh
    with pytest.raises(CellrepError, match="scale"):
        shard_blocks(task)
