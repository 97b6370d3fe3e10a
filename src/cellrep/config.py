"""Structured-config schemas: a bad override fails when the config is composed.

Each config group (``data/``, ``split/``, ``model/``, ``task/``, ``trainer/``,
``paths/``) has a dataclass registered in Hydra's ConfigStore as
``<group>/schema_<name>``; the group's YAML files list it first in their
defaults. Unknown keys and wrong types then fail at compose time. Checks that
need code (is the model name known to timm?) live in ``__post_init__`` and run
in :func:`to_schema`, before any data is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from cellrep.errors import CellrepError
from cellrep.schema import RXRX1_CHANNELS

Normalization = Enum("Normalization", ["plate_controls", "self", "global"])
SplitName = Enum("SplitName", ["batch", "random", "cell_type", "official"])
SourceName = Enum("SourceName", ["synthetic", "rxrx1"])


@dataclass
class SyntheticScreenConfig:
    seed: int = 0
    cell_types: list[str] = field(default_factory=lambda: ["HUVEC", "RPE"])
    experiments_per_cell_type: int = 4
    plates_per_experiment: int = 1
    sites_per_well: int = 2
    image_size: int = 64
    channel_names: list[str] = field(default_factory=lambda: list(RXRX1_CHANNELS))
    num_modules: int = 6
    genes_per_module: int = 4
    annotation_source: str = "StringDB"
    num_compounds: int = 6
    concentrations: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])
    control_wells_per_plate: int = 4
    effect_strength: float = 1.0
    batch_effect_strength: float = 1.0


@dataclass
class DataConfig:
    source: SourceName = MISSING
    root: Optional[str] = None  # the dataset in its own format (synthetic: generated here)
    shards_dir: Optional[str] = None  # null: next to the source (synthetic: <root>/<fingerprint>/shards)
    channel_names: Optional[list[str]] = None  # expected channels; null = whatever the source has
    samples_per_shard: int = 256
    shard_workers: int = 0
    normalization: Normalization = Normalization.plate_controls
    crop_size: int = 48
    batch_size: int = 64
    num_workers: int = 2
    label_column: str = "perturbation"
    synthetic: Optional[SyntheticScreenConfig] = None


@dataclass
class SplitConfig:
    name: SplitName = MISSING
    test_fraction: float = 0.21  # 9 of 42 experiments in the RxRx1 paper
    val_fraction: float = 0.1
    holdout: Optional[str] = None  # cell_type split: the held-out cell type
    shots: int = 0  # cell_type split: sites per perturbation of the held-out type put in train
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 <= self.val_fraction < 1.0:
            raise CellrepError(
                f"split fractions out of range (test_fraction={self.test_fraction}, val_fraction={self.val_fraction})",
                fix="use 0 < split.test_fraction < 1 and 0 <= split.val_fraction < 1",
            )
        if self.name == SplitName.cell_type and not self.holdout:
            raise CellrepError("split=cell_type needs a held-out cell type", fix="add split.holdout=<cell type>")


@dataclass
class ModelConfig:
    name: str = MISSING  # any timm model name
    img_size: Optional[int] = None  # ViTs: the input size (defaults to data.crop_size)
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model

    def __post_init__(self) -> None:
        from cellrep.models.backbone import check_model_name

        check_model_name(self.name)


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # any timm optimizer name (adamw, lion, sgd, ...)
    base_lr: float = 1e-3  # learning rate at a global batch of 256; scaled linearly
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedulerConfig:
    warmup_fraction: float = 0.05  # of all optimizer steps
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of the peak LR


@dataclass
class TaskConfig:
    name: str = "supervised"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    label_smoothing: float = 0.0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int = 10
    max_steps: int = -1
    min_epochs: Optional[int] = None
    max_time: Optional[str] = None
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    limit_test_batches: Optional[float] = None
    val_check_interval: Optional[float] = None
    check_val_every_n_epoch: int = 1
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    deterministic: bool = False
    benchmark: Optional[bool] = None
    fast_dev_run: Any = False
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    detect_anomaly: bool = False
    default_root_dir: Optional[str] = None


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    log_dir: str = MISSING
    output_dir: str = MISSING


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="data", name="schema_data", node=DataConfig)
    cs.store(group="split", name="schema_split", node=SplitConfig)
    cs.store(group="model", name="schema_model", node=ModelConfig)
    cs.store(group="task", name="schema_task", node=TaskConfig)
    cs.store(group="trainer", name="schema_trainer", node=TrainerConfig)
    cs.store(group="paths", name="schema_paths", node=PathsConfig)


_SCHEMAS = {
    "data": DataConfig,
    "split": SplitConfig,
    "model": ModelConfig,
    "task": TaskConfig,
    "trainer": TrainerConfig,
    "paths": PathsConfig,
}


def to_schema(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate every group's dataclass, running its ``__post_init__`` checks."""
    out = {}
    for group in _SCHEMAS:
        if group in cfg:
            try:
                out[group] = OmegaConf.to_object(cfg[group])
            except CellrepError:
                raise
            except Exception as exc:  # missing mandatory values and the like
                raise CellrepError(f"config group '{group}' is incomplete: {exc}",
                                   fix=f"set the missing value on the command line, e.g. {group}.<key>=...") from None
    return out
