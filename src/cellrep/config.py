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

from cellrep.data.schema import RXRX1_CHANNELS
from cellrep.errors import CellrepError

Normalization = Enum("Normalization", ["plate_controls", "self", "global"])
SplitName = Enum("SplitName", ["batch", "random", "cell_type", "official"])
SourceName = Enum("SourceName", ["synthetic", "rxrx1", "rxrx3_core", "tiff"])
BitDepthRule = Enum("BitDepthRule", ["percentile", "max", "shift"])
TiffLayout = Enum("TiffLayout", ["auto", "per_channel", "multipage", "load_data"])


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
    module_similarity: float = 0.6  # cosine between phenotypes of two genes of one module
    gene_groups: int = 1  # >=2: plate p holds gene group (p-1) mod gene_groups (RxRx1-style plate groups)


@dataclass
class PlateMapConfig:
    path: str = MISSING  # CSV (or .tsv/.txt: tab-separated), relative to data.root
    keys: list[str] = field(default_factory=list)  # join columns; empty: those both share (`on:` is YAML for true)


@dataclass
class TiffConfig:
    """Options of data=tiff (and data=jump_load_data); see cellrep.data.sources.tiff_plates."""

    layout: TiffLayout = TiffLayout.auto  # auto: load_data if FileName_Orig* columns, else from data.pattern
    constants: dict[str, Any] = field(default_factory=dict)  # canonical column -> value for every row
    negative_controls: list[str] = field(default_factory=list)  # perturbation names of negative-control wells
    plate_maps: list[PlateMapConfig] = field(default_factory=list)  # left-joined onto the metadata in order
    path_prefixes: list[list[str]] = field(default_factory=list)  # load_data: [[old, new]] PathName rewrites
    percentile: list[float] = field(default_factory=lambda: [0.1, 99.9])  # percentile rule: clip levels
    sample_sites: int = 8  # percentile rule: sites per plate the levels are computed from
    max_value: int = 65535  # max rule: this value maps to 255
    shift: int = 8  # shift rule: value >> shift

    def __post_init__(self) -> None:
        lo, hi = (list(self.percentile) + [None, None])[:2]
        if len(self.percentile) != 2 or not 0.0 <= lo < hi <= 100.0:
            raise CellrepError(
                f"data.tiff.percentile={list(self.percentile)} is not [low, high] in 0..100",
                fix="e.g. data.tiff.percentile=[0.1,99.9]",
            )
        if self.sample_sites < 1 or self.max_value < 1 or not 0 <= self.shift <= 16:
            raise CellrepError(
                f"data.tiff: sample_sites={self.sample_sites}, max_value={self.max_value}, "
                f"shift={self.shift} out of range",
                fix="use sample_sites >= 1, max_value >= 1, 0 <= shift <= 16",
            )


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
    # real-dataset readers (data=rxrx3_core, data=tiff): cellrep.data.sources.rxrx3_core, cellrep.data.sources.tiff_plates
    metadata: Optional[str] = None  # metadata table relative to root; null: the dataset's standard name
    pattern: Optional[str] = None  # tiff: image path template, e.g. {plate}/{well}_s{site}_w{channel_index}.tif
    columns: dict[str, str] = field(default_factory=dict)  # tiff: canonical column -> metadata column
    bit_depth_rule: BitDepthRule = BitDepthRule.percentile  # tiff: 16->8 bit rule, recorded in the manifest
    max_bad_fraction: float = 0.01  # sharding fails when more of the input is bad (cellrep.data.shards.writer)
    max_corrupt: int = 100  # training stops after more corrupt shard members were skipped (DESIGN §7)
    # flips/rot90 of training crops: on the device with normalization (null: when CUDA is available),
    # or in the loader workers (false: CPU-only training keeps them in parallel processes)
    augment_on_device: Optional[bool] = None
    tiff: Optional[TiffConfig] = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise CellrepError(
                f"data.max_bad_fraction={self.max_bad_fraction} is not a fraction",
                fix="use 0 (no bad input tolerated) .. 1; default 0.01",
            )
        if self.max_corrupt < 0:
            raise CellrepError(
                f"data.max_corrupt={self.max_corrupt} is negative",
                fix="use 0 (stop at the first corrupt shard member) or more; default 100",
            )


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
    # cell-type context vectors (cellrep.knowledge.context): a CSV cell_type,v0,v1,...; "synthetic": derived
    # from the synthetic screen's generator; null: none. ViTs get an extra token, CNNs FiLM on pooled features.
    context_path: Optional[str] = None

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
class GraphPriorConfig:
    """Knowledge-graph prior of both tasks (DESIGN §6, cellrep.knowledge.graph_loss): supervised on the pooled
    backbone features, MAE on the pooled encoder features."""

    graph_loss: str = "none"  # none | graph_contrastive | laplacian
    graph_weight: float = 0.1
    graph_temperature: float = 0.1
    graph_path: str = "StringDB"  # a shipped annotation name, or a STRING / Hetionet / entity1,entity2 file
    graph_nodes: Optional[str] = None  # node table mapping ids to symbols (Hetionet nodes.tsv, STRING protein.info)

    def __post_init__(self) -> None:
        from cellrep.knowledge.graph_loss import GRAPH_LOSSES

        if self.graph_loss not in GRAPH_LOSSES:
            raise CellrepError(f"unknown task.graph_loss '{self.graph_loss}'", fix=f"use one of {list(GRAPH_LOSSES)}")
        if self.graph_weight < 0 or self.graph_temperature <= 0:
            raise CellrepError(
                f"task.graph_weight={self.graph_weight} / task.graph_temperature={self.graph_temperature} out of range",
                fix="use graph_weight >= 0 and graph_temperature > 0 (0.1 in DESIGN §6)",
            )


@dataclass
class TaskConfig(GraphPriorConfig):
    name: str = "supervised"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    label_smoothing: float = 0.0
    init_from: Optional[str] = None  # checkpoint whose encoder starts the backbone (keys checked exactly)
    monitor: str = "val/acc"  # the metric that picks checkpoints/best.ckpt
    monitor_mode: str = "max"
    # de novo protocol (split=cell_type, split.shots=k; cellrep.training.fewshot): after training on the other
    # cell types, fine-tune this many epochs on the k shots of the held-out type; 0: one joint fit (shots in train)
    finetune_epochs: int = 0
    finetune_base_lr: Optional[float] = None  # null: optimizer.base_lr

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_init_from(self.init_from)
        if self.finetune_epochs < 0:
            raise CellrepError(
                f"task.finetune_epochs={self.finetune_epochs} is negative",
                fix="use 0 (no fine-tuning phase) or a positive number of epochs",
            )


@dataclass
class MAETaskConfig(GraphPriorConfig):
    """Masked-autoencoder pretraining (task=mae); see cellrep.training.tasks.mae."""

    name: str = "mae"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # MSE against per-patch standardized pixels
    fourier_weight: float = 0.01  # weight of the L1 loss between |FFT2| of reconstruction and target
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile every transformer block
    reconstructions_every_n_steps: int = 500  # masked/reconstruction/target images to the loggers; 0 = off
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise CellrepError(
                f"task.mask_ratio={self.mask_ratio} leaves nothing to see or nothing to predict",
                fix="use 0 < task.mask_ratio < 1 (0.75 in the MAE papers)",
            )
        if self.fourier_weight < 0:
            raise CellrepError(f"task.fourier_weight={self.fourier_weight} is negative", fix="use a weight >= 0")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise CellrepError(
                f"task.decoder_dim={self.decoder_dim} must be divisible by decoder_heads="
                f"{self.decoder_heads} and by 4 (sin-cos positions)",
                fix="e.g. decoder_dim=512",
            )


def _check_init_from(path: Optional[str]) -> None:
    from pathlib import Path

    if path is not None and not Path(path).is_file():
        raise CellrepError(
            f"task.init_from: no checkpoint at {path}",
            fix="point it at a pretraining run's checkpoints/last.ckpt (or drop task.init_from)",
        )


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


# ---------------------------------------------------------------------------
# Evaluation: cellrep-probe and cellrep-eval (DESIGN §5). Primary configs
# `probe.yaml` / `eval.yaml` use these as their schema; each benchmark in
# `benchmarks/` has its own node. Groups composed into them (data, split,
# logger, paths) keep their own schemas above.
# ---------------------------------------------------------------------------

BENCHMARKS = ("recall", "consistency", "dti", "classification")
CORRECTIONS = ("none", "pca_centerscale", "tvn")


@dataclass
class LoaderConfig:
    batch_size: int = 64
    num_workers: int = 2


@dataclass
class ProbeTrainingConfig:
    lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    epochs: int = 30
    batch_size: int = 256
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if not self.lrs or min(self.lrs) <= 0 or self.epochs < 1 or self.batch_size < 2:
            raise CellrepError(
                f"probe settings out of range (lrs={self.lrs}, epochs={self.epochs}, batch_size={self.batch_size})",
                fix="use positive learning rates, probe.epochs >= 1, probe.batch_size >= 2",
            )


@dataclass
class RecallConfig:
    sources: list[str] = field(default_factory=lambda: ["StringDB", "HuMAP", "Reactome"])
    thresholds: list[list[float]] = field(default_factory=lambda: [[0.05, 0.95], [0.1, 0.9]])

    def __post_init__(self) -> None:
        for pair in self.thresholds:
            if len(pair) != 2 or not 0.0 <= pair[0] < pair[1] <= 1.0:
                raise CellrepError(
                    f"recall threshold {list(pair)} is not a (lower, upper) pair in [0, 1]",
                    fix="use e.g. benchmarks.recall.thresholds=[[0.05,0.95],[0.1,0.9]]",
                )


@dataclass
class ConsistencyConfig:
    null_samples: int = 1000
    alpha: float = 0.05


@dataclass
class DTIConfig:
    targets: str = "auto"  # CSV compound,gene,activity_nM; auto: <dataset root>/compound_targets.csv
    seeds: int = 100
    positive_nM: float = 1000.0
    negative_nM: float = 10000.0
    min_negatives: int = 20


@dataclass
class ClassificationConfig:
    plate_groups: bool = True


@dataclass
class ProbeRunConfig:
    """cellrep-probe: ``ckpt_path`` plus probe settings; data/split come from the training run."""

    ckpt_path: Optional[str] = None
    use_run_config: bool = True  # take data + split from <run>/config.yaml next to the checkpoint
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    probe: ProbeTrainingConfig = field(default_factory=ProbeTrainingConfig)
    task: dict[str, Any] = field(default_factory=lambda: {"name": "probe"})
    model: dict[str, Any] = field(default_factory=lambda: {"name": "checkpoint"})  # filled from the checkpoint
    data: Any = None
    split: Any = None
    logger: Any = None
    paths: Any = None


@dataclass
class EvalRunConfig(ProbeRunConfig):
    """cellrep-eval: a checkpoint (``ckpt_path``) or an embeddings parquet (``embeddings``)."""

    embeddings: Optional[str] = None
    metadata: Optional[str] = None  # a separate metadata table for `embeddings`, joined on join_on
    join_on: str = "well_id"
    rename: Any = (
        None  # {file column: canonical column}, e.g. {gene: perturbation} (Any: Hydra cannot merge into a None dict)
    )
    block: str = "best"  # an index, a block name, "last", or "best" (probe, or probe_results)
    probe_results: Optional[str] = None  # probe.json of a cellrep-probe run, for block=best
    corrections: list[str] = field(default_factory=lambda: list(CORRECTIONS))
    write_corrected: bool = True
    benchmarks: Any = None
    task: dict[str, Any] = field(default_factory=lambda: {"name": "eval"})

    def __post_init__(self) -> None:
        bad = [c for c in self.corrections if c not in CORRECTIONS]
        if bad or not self.corrections:
            raise CellrepError(
                f"unknown batch correction(s) {bad}" if bad else "corrections is empty",
                fix=f"use corrections=[...] from {list(CORRECTIONS)}",
            )
        if self.rename is not None and not (
            isinstance(self.rename, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.rename.items())
        ):
            raise CellrepError(
                f"rename={self.rename!r} is not a mapping of column names",
                fix="use rename={file_column:canonical_column,...}, e.g. rename={gene:perturbation}",
            )
        if (self.ckpt_path is None) == (self.embeddings is None):
            raise CellrepError(
                "cellrep-eval needs exactly one of ckpt_path=... and embeddings=...",
                fix="pass ckpt_path=<checkpoint> or embeddings=<parquet with feature_* columns>",
            )


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="data", name="schema_data", node=DataConfig)
    cs.store(group="split", name="schema_split", node=SplitConfig)
    cs.store(group="model", name="schema_model", node=ModelConfig)
    cs.store(group="task", name="schema_task", node=TaskConfig)
    cs.store(group="task", name="schema_mae_task", node=MAETaskConfig)
    cs.store(group="trainer", name="schema_trainer", node=TrainerConfig)
    cs.store(group="paths", name="schema_paths", node=PathsConfig)
    # evaluation (see the block above)
    cs.store(name="schema_probe", node=ProbeRunConfig)
    cs.store(name="schema_eval", node=EvalRunConfig)
    for name, node in (
        ("recall", RecallConfig),
        ("consistency", ConsistencyConfig),
        ("dti", DTIConfig),
        ("classification", ClassificationConfig),
    ):
        cs.store(group="benchmarks", name=f"schema_{name}", node={name: node})


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
                raise CellrepError(
                    f"config group '{group}' is incomplete: {exc}",
                    fix=f"set the missing value on the command line, e.g. {group}.<key>=...",
                ) from None
    return out
