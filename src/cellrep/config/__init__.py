"""Structured-config schemas: a bad override fails when the config is composed, or at the latest in
:func:`to_schema`, before any data is touched.

Each config group (``data/``, ``split/``, ``model/``, ``task/``, ``trainer/``,
``paths/``, ``benchmarks/``) has a dataclass registered in Hydra's ConfigStore
as the top-level config ``schema_<name>``, outside the groups so that
``--help`` does not offer it as an option; the group's YAML files list it first
in their defaults (``- /schema_model@_here_``). Unknown keys and wrong types
then fail at compose time. Every default is defined once, in this package: a YAML file
sets only what differs from it. Checks that need code (is the model name known
to timm? is the value one of the allowed ones?) live in ``__post_init__`` and
run in :func:`to_schema`; the allowed values come from the module that uses
them (``NORMALIZATIONS``, ``SPLITS``, ``SOURCES``, ...).
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from cellrep.config.data import DataConfig, PlateMapConfig, SplitConfig, SyntheticScreenConfig, TiffConfig
from cellrep.config.eval import (
    BENCHMARKS,
    CORRECTIONS,
    ClassificationConfig,
    ConsistencyConfig,
    CorrectionConfig,
    CorrectionScoresConfig,
    DTIConfig,
    EvalRunConfig,
    LoaderConfig,
    MagnitudeConfig,
    MapActivityConfig,
    MapConsistencyConfig,
    PlotsConfig,
    ProbeRunConfig,
    ProbeTrainingConfig,
    RecallConfig,
)
from cellrep.config.model import ModelConfig
from cellrep.config.task import (
    DINOTaskConfig,
    FewShotProtocolConfig,
    GraphPriorConfig,
    MAETaskConfig,
    OptimizerConfig,
    SchedulerConfig,
    SimCLRTaskConfig,
    TaskConfig,
)
from cellrep.config.trainer import PathsConfig, TrainerConfig
from cellrep.errors import CellrepError

__all__ = [
    "BENCHMARKS",
    "CORRECTIONS",
    "ClassificationConfig",
    "ConsistencyConfig",
    "CorrectionConfig",
    "CorrectionScoresConfig",
    "DINOTaskConfig",
    "DTIConfig",
    "DataConfig",
    "EvalRunConfig",
    "FewShotProtocolConfig",
    "GraphPriorConfig",
    "LoaderConfig",
    "MAETaskConfig",
    "MagnitudeConfig",
    "MapActivityConfig",
    "MapConsistencyConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PathsConfig",
    "PlateMapConfig",
    "PlotsConfig",
    "ProbeRunConfig",
    "ProbeTrainingConfig",
    "RecallConfig",
    "SchedulerConfig",
    "SimCLRTaskConfig",
    "SplitConfig",
    "SyntheticScreenConfig",
    "TaskConfig",
    "TiffConfig",
    "TrainerConfig",
    "register_configs",
    "to_schema",
]


def register_configs() -> None:
    """Top-level ``schema_<name>`` configs: stored inside a group, Hydra would list them among its options."""
    cs = ConfigStore.instance()
    for name, node in (
        ("data", DataConfig),
        ("split", SplitConfig),
        ("model", ModelConfig),
        ("task", TaskConfig),
        ("mae_task", MAETaskConfig),
        ("dino_task", DINOTaskConfig),
        ("simclr_task", SimCLRTaskConfig),
        ("trainer", TrainerConfig),
        ("paths", PathsConfig),
        ("probe", ProbeRunConfig),  # primary configs of the evaluation (see the block above)
        ("eval", EvalRunConfig),
    ):
        cs.store(name=f"schema_{name}", node=node)
    for name, node in (
        ("recall", RecallConfig),
        ("consistency", ConsistencyConfig),
        ("dti", DTIConfig),
        ("classification", ClassificationConfig),
        ("map_activity", MapActivityConfig),
        ("map_consistency", MapConsistencyConfig),
        ("magnitude", MagnitudeConfig),
        ("correction_scores", CorrectionScoresConfig),
    ):
        cs.store(name=f"schema_{name}", node={name: node})  # benchmarks/<name>.yaml: benchmarks.<name>


_SCHEMAS = {
    "data": DataConfig,
    "split": SplitConfig,
    "model": ModelConfig,
    "task": TaskConfig,
    "trainer": TrainerConfig,
    "paths": PathsConfig,
}


def to_schema(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate every group's dataclass, running its ``__post_init__`` checks, then the checks across groups."""
    out = {}
    for group in _SCHEMAS:
        if group in cfg:
            try:
                out[group] = OmegaConf.to_object(cfg[group])
            except CellrepError:
                raise
            except Exception as exc:  # missing mandatory values and the like
                raise CellrepError(
                    f"config group '{group}' is incomplete: {exc}",
                    fix=f"set the missing value on the command line, e.g. {group}.<key>=...",
                ) from None
    if isinstance(out.get("task"), (MAETaskConfig, DINOTaskConfig)) and "model" in out and "data" in out:
        _check_patch_model(out["task"].name, out["model"], out["data"])
    if "model" in out and "data" in out and out["data"].channel_sampling:
        name = getattr(out.get("task"), "name", "supervised")
        if name not in ("supervised", "mae", "simclr"):  # the tasks that pass a batch's channel_ids to the encoder
            raise CellrepError(
                f"data.channel_sampling=true is not supported by task={name}",
                fix="use task=supervised, task=mae or task=simclr, or set data.channel_sampling=false",
            )
        _check_channel_sampling(out["model"])
    return out


def _check_channel_sampling(model: ModelConfig) -> None:
    """data.channel_sampling drops channels per batch: only a channel-agnostic model takes that."""
    import torch

    from cellrep.models.backbone import build_backbone

    try:
        with torch.device("meta"):
            encoder = build_backbone(model.name, in_chans=1, img_size=model.img_size, **dict(model.kwargs))
    except CellrepError:
        raise
    except Exception:  # noqa: BLE001 — cannot be built on the meta device: the real build will tell
        return
    if not getattr(encoder, "channel_agnostic", False):
        raise CellrepError(
            f"data.channel_sampling=true needs a channel-agnostic model; {model.name} takes a fixed channel count",
            fix="use a model=ca_vit_* (e.g. model=ca_vit_s16), or set data.channel_sampling=false",
        )


def _check_patch_model(task: str, model: ModelConfig, data: DataConfig) -> None:
    """task=mae masks patch tokens and task=dino distils class and patch tokens: the encoder must be a
    patch-based ViT whose patches tile the crop.

    Otherwise the task fails when it is built or at its first step, after the screen was generated and
    sharded. The encoder is built on the meta device (structure only, no memory) and asked what the
    task asks it.
    """
    import torch

    from cellrep.models.backbone import build_backbone
    from cellrep.models.vit import patch_size_of

    try:
        with torch.device("meta"):
            encoder = build_backbone(model.name, in_chans=1, img_size=model.img_size, **dict(model.kwargs))
    except CellrepError:
        raise
    except Exception:  # noqa: BLE001 — a model that cannot be built on the meta device: the real build will tell
        return
    try:
        patch = patch_size_of(encoder)
    except CellrepError as exc:
        raise CellrepError(f"task={task} cannot use model {model.name}: {exc.problem}", fix=exc.fix) from None
    if data.crop_size % patch:
        raise CellrepError(
            f"task={task}: data.crop_size={data.crop_size} is not a multiple of {model.name}'s patch size {patch}",
            fix=f"set data.crop_size to a multiple of {patch}",
        )
