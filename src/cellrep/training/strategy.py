"""The Lightning strategy object for ``trainer.strategy``, and how a task shards itself under FSDP.

``fsdp`` (``trainer=fsdp``) is FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
``ModelParallelStrategy`` with every rank on the data-parallel axis and no tensor parallelism. Each
transformer block (timm ``Block``: ViT, CA-ViT, the MAE decoder) and residual block (timm ResNet
``Bottleneck``/``BasicBlock``) is its own unit, so only one block's full parameters are gathered at
a time; the task's top-level modules hold what is left. Why FSDP2 and not Lightning's
``FSDPStrategy``: FSDP1 needs a CUDA device (torch refuses a CPU one), FSDP2 runs on CPU with gloo,
so the same strategy that shards ViT-G/8 on GPUs is exercised by the CPU test suite. Checkpoints
are full state dicts saved by rank 0 (``save_distributed_checkpoint=False``): one ``last.ckpt``
with the parameter names of an unsharded run, which resumes at any world size and which
``cellrep-probe`` reads. Every other strategy name passes through to Lightning unchanged.
"""

from __future__ import annotations

import logging

import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block

from cellrep.errors import CellrepError

log = logging.getLogger(__name__)

WRAPPED_BLOCKS = (Block, Bottleneck, BasicBlock)
# A unit gathers its parameters when one of these is called, not only ``forward``: tasks call a backbone's
# ``forward_features`` / ``forward_head``, the probes ``forward_intermediates``.
FORWARD_METHODS = ("forward_features", "forward_head", "forward_intermediates")


class FSDPStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks: data parallel size = world size, tensor parallel size 1."""

    def __init__(self, **kwargs):
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        # Lightning's "auto" puts the ranks of a node on the tensor-parallel axis; FSDP shards across all of them
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def trainer_strategy(name: str):
    """``name`` as Lightning takes it, or, for ``fsdp``, the FSDP2 strategy (tasks shard in ``configure_model``)."""
    return FSDPStrategy() if name == "fsdp" else name


def shard_blocks(task: nn.Module) -> None:
    """Under ``trainer=fsdp``, make each known block an FSDP unit, then each top-level child holding parameters.

    Called from every task's ``configure_model``; a no-op under any other strategy (no device mesh)
    and when called again (Lightning calls the hook for fit and again for test). A parameter outside
    every unit would get no gradient reduction and the ranks would drift apart, so one on the task
    itself is refused. A path that reaches a backbone's submodules without going through one of its
    ``FORWARD_METHODS`` (the cell-type context token of ``models/context.py``) is not supported.
    """
    mesh = getattr(task, "_device_mesh", None)
    if mesh is None:
        return
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if any(isinstance(m, FSDPModule) for m in task.modules()):
        return
    own = [n for n, _ in task.named_parameters(recurse=False)]
    if own:
        raise CellrepError(
            f"FSDP: {type(task).__name__} holds parameters outside any submodule ({', '.join(own)})",
            fix="keep a task's parameters in submodules (they become FSDP units), or use trainer=ddp",
        )
    mesh = mesh["data_parallel"]
    blocks = [m for m in task.modules() if isinstance(m, WRAPPED_BLOCKS)]
    for block in blocks:  # before the modules holding them: FSDP2 shards bottom-up
        fully_shard(block, mesh=mesh)
    children = [c for c in task.children() if any(True for _ in c.parameters())]
    for child in children:
        fully_shard(child, mesh=mesh)
        for method in FORWARD_METHODS:
            if hasattr(child, method):
                register_fsdp_forward_method(child, method)
    kinds = sorted({type(b).__name__ for b in blocks})
    log.info("FSDP: %d blocks (%s) + %d top-level units", len(blocks), ", ".join(kinds) or "none", len(children))
