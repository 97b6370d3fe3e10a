"""Structured-config schemas: a bad override fails when the config is composed, or at the latest in
:func:`to_schema`, before any data is touched.

Each config group (``data/``, ``split/``, ``model/``, ``task/``, ``trainer/``,
``paths/``, ``benchmarks/``) has a dataclass registered in Hydra's ConfigStore
as the top-level config ``schema_<name>``, outside the groups so that
``--help`` does not offer it as an option; the group's YAML files list it first
in their defaults (``- /schema_model@_here_``). Unknown keys and wrong types
then fail at compose time. Every default is defined once, here: a YAML file
sets only what differs from it. Checks that need code (is the model name known
to timm? is the value one of the allowed ones?) live in ``__post_init__`` and
run in :func:`to_schema`; the allowed values come from the module that uses
them (``NORMALIZATIONS``, ``SPLITS``, ``SOURCES``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from cellrep.data.schema import RXRX1_CHANNELS
from cellrep.errors import CellrepError


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CellrepError(f"unknown {key} '{value}'", fix=f"set {key} to one of {list(allowed)}")


def _at_least(key: str, value: float, least: float) -> None:
    if value < least:
        raise CellrepError(f"{key}={value} is below {least}", fix=f"use {key} >= {least}")


@dataclass
class SyntheticScreenConfig:
    # Defaults: the realistic screen (docs/data.md, "The synthetic screen"); debug=tiny shrinks it.
    seed: int = 0
    cell_types: list[str] = field(default_factory=lambda: ["HUVEC", "RPE"])
    experiments_per_cell_type: int = 4
    plates_per_experiment: int = 3
    sites_per_well: int = 3
    image_size: int = 40
    channel_names: list[str] = field(default_factory=lambda: list(RXRX1_CHANNELS))
    num_modules: int = 25
    genes_per_module: int = 4
    annotation_source: str = "StringDB"
    num_compounds: int = 12
    concentrations: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0])
    control_wells_per_plate: int = 8  # EMPTY_control wells per plate
    crispr_control_wells_per_plate: int = 8  # CRISPR_control wells per plate (also negative controls)
    positive_controls: int = 3  # positive-control perturbations, one well each on every plate
    gene_perturbation_type: str = "CRISPR"  # or siRNA
    effect_strength: float = 1.0
    batch_effect_strength: float = 1.0
    module_similarity: float = 0.6  # cosine between phenotypes of two genes of one module
    gene_groups: int = 4  # each plate holds one of these disjoint gene groups (RxRx1-style plate groups)
    rotate_groups: bool = True  # groups move one plate per experiment: genes miss some experiments
    slot_drift: float = 2.0  # plate-slot morphology shift of plates >= 2 (debug=tiny: 6.0)
    cell_type_modulation: float = 0.0  # per-cell-type gain + rotation of every phenotype, in [0, 2]; 0: off

    def __post_init__(self) -> None:
        from cellrep.data.sources.synthetic_modulation import check_strength

        check_strength(self.cell_type_modulation)


@dataclass
class PlateMapConfig:
    path: str = MISSING  # CSV (or .tsv/.txt: tab-separated), relative to data.root
    keys: list[str] = field(default_factory=list)  # join columns; empty: those both share (`on:` is YAML for true)


@dataclass
class TiffConfig:
    """Options of data=tiff (and data=jump_load_data); see cellrep.data.sources.tiff_plates."""

    layout: str = "auto"  # auto: load_data if FileName_Orig* columns, else from data.pattern (see LAYOUTS)
    constants: dict[str, Any] = field(default_factory=dict)  # canonical column -> value for every row
    negative_controls: list[str] = field(default_factory=list)  # perturbation names of negative-control wells
    plate_maps: list[PlateMapConfig] = field(default_factory=list)  # left-joined onto the metadata in order
    path_prefixes: list[list[str]] = field(default_factory=list)  # load_data: [[old, new]] PathName rewrites
    percentile: list[float] = field(default_factory=lambda: [0.1, 99.9])  # percentile rule: clip levels
    sample_sites: int = 8  # percentile rule: sites per plate the levels are computed from
    max_value: int = 65535  # max rule: this value maps to 255
    shift: int = 8  # shift rule: value >> shift

    def __post_init__(self) -> None:
        from cellrep.data.sources.tiff_plates import LAYOUTS

        _one_of("data.tiff.layout", self.layout, LAYOUTS)
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
    source: str = MISSING  # one of cellrep.data.shards.prepare.SOURCES
    root: Optional[str] = None  # the dataset in its own format (synthetic: generated here)
    shards_dir: Optional[str] = None  # null: next to the source (synthetic: <root>/<fingerprint>/shards); or a URL
    shards_cache: str = "${paths.data_dir}/remote_shards"  # local mirrors of URL shard sets (data/shards/remote.py)
    channel_names: Optional[list[str]] = None  # expected channels; null = whatever the source has
    samples_per_shard: int = 256
    shard_workers: int = 0
    # cellrep-shard on a cluster (docs/data.md, "Sharding on a cluster"): write part shard_part of
    # shard_parts (whole plates; null: all of it, as one process); shard_merge: only merge finished parts
    shard_part: Optional[int] = None
    shard_parts: int = 1
    shard_merge: bool = False
    encoding: str = "npy"  # how shards store images: npy | npy_zstd | png | jp2 (cellrep.data.shards.codecs)
    normalization: str = "plate_controls"  # one of cellrep.data.loading.transforms.NORMALIZATIONS
    crop_size: int = 48
    batch_size: int = 64  # per device
    num_workers: int = 2  # loader worker processes; 0: load in the main process
    label_column: str = "perturbation"
    synthetic: Optional[SyntheticScreenConfig] = None
    # real-dataset readers (data=rxrx3_core, data=tiff): cellrep.data.sources.rxrx3_core, cellrep.data.sources.tiff_plates
    metadata: Optional[str] = None  # metadata table relative to root; null: the dataset's standard name
    pattern: Optional[str] = None  # tiff: image path template, e.g. {plate}/{well}_s{site}_w{channel_index}.tif
    columns: dict[str, str] = field(default_factory=dict)  # tiff: canonical column -> metadata column
    bit_depth_rule: str = "percentile"  # tiff: 16->8 bit rule (percentile | max | shift), recorded in the manifest
    max_bad_fraction: float = 0.01  # sharding fails when more of the input is bad (cellrep.data.shards.writer)
    # training stops after more corrupt shard members were skipped (docs/architecture.md, "Bad input")
    max_corrupt: int = 100
    # flips/rot90 of training crops: on the device with normalization (null: when CUDA is available),
    # or in the loader workers (false: CPU-only training keeps them in parallel processes)
    augment_on_device: Optional[bool] = None
    # training: each batch sees a random non-empty channel subset (size uniform in 1..C; ChannelViT);
    # channel-agnostic models (ca_vit_*) only (cellrep.data.loading.transforms.BatchFinisher)
    channel_sampling: bool = False
    tiff: Optional[TiffConfig] = None

    def __post_init__(self) -> None:
        from cellrep.data.loading.transforms import check_normalization
        from cellrep.data.shards.prepare import SOURCES
        from cellrep.data.sources.tiff_pixels import RULES

        _one_of("data.source", self.source, SOURCES)
        check_normalization(self.normalization)
        _one_of("data.bit_depth_rule", self.bit_depth_rule, RULES)
        # each of these fails later anyway, but only after the screen was generated and sharded
        for key in ("batch_size", "crop_size", "samples_per_shard"):
            _at_least(f"data.{key}", getattr(self, key), 1)
        _at_least("data.num_workers", self.num_workers, 0)
        _at_least("data.shard_parts", self.shard_parts, 1)
        from cellrep.data.shards.codecs import check_encoding

        check_encoding(self.encoding)
        if self.shard_part is not None and not 0 <= self.shard_part < self.shard_parts:
            raise CellrepError(
                f"data.shard_part={self.shard_part} is not a part of data.shard_parts={self.shard_parts}",
                fix=f"use data.shard_part=0..{self.shard_parts - 1} (or range({self.shard_parts}) in a sweep)",
            )
        if self.shard_merge and self.shard_part is not None:
            raise CellrepError(
                "data.shard_merge=true merges the parts; it writes no part itself",
                fix="drop data.shard_part from the merge command (keep data.shard_parts=N)",
            )
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
    name: str = MISSING  # one of cellrep.data.loading.splits.SPLITS
    # batch: held-out experiments per cell type (9 of 42 in the RxRx1 paper); random: sites of every experiment
    test_fraction: float = 0.21
    val_fraction: float = 0.1
    holdout: Optional[str] = None  # cell_type split: the held-out cell type
    shots: int = 0  # cell_type split: sites per perturbation of the held-out type put in train
    seed: int = 0

    def __post_init__(self) -> None:
        from cellrep.data.loading.splits import check_split

        check_split(self.name, self.test_fraction, self.val_fraction, self.holdout, self.shots)


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
        if self.img_size is not None:
            _at_least("model.img_size", self.img_size, 1)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise CellrepError(f"model.drop_path_rate={self.drop_path_rate} is not in [0, 1)", fix="e.g. 0.1")


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # any timm optimizer name (adamw, lion, sgd, ...)
    base_lr: float = 1e-3  # learning rate at a global batch of 256; scaled linearly
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self) -> None:
        # torch refuses both when the optimizer is built, after the data is ready
        _at_least("task.optimizer.base_lr", self.base_lr, 0.0)
        _at_least("task.optimizer.weight_decay", self.weight_decay, 0.0)


@dataclass
class SchedulerConfig:
    warmup_fraction: float = 0.05  # of all optimizer steps
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of the peak LR


@dataclass
class FewShotProtocolConfig:
    """The de novo protocol's phase after the first fit (split=cell_type, split.shots=k; cellrep.training.fewshot,
    docs/FEWSHOT.md), the same for every task: a supervised fine-tune on the k shots of the held-out type."""

    # fine-tune this many epochs on the k shots of the held-out type; 0: one joint fit (shots in train)
    finetune_epochs: int = 0
    finetune_base_lr: Optional[float] = None  # null: optimizer.base_lr

    def __post_init__(self) -> None:
        if self.finetune_epochs < 0:
            raise CellrepError(
                f"task.finetune_epochs={self.finetune_epochs} is negative",
                fix="use 0 (no fine-tuning phase) or a positive number of epochs",
            )


@dataclass
class GraphPriorConfig(FewShotProtocolConfig):
    """Knowledge-graph prior of every task (docs/FEWSHOT.md, cellrep.knowledge.graph_loss): supervised on the pooled
    backbone features, MAE on the pooled encoder features, DINO on the student's class token, SimCLR on the mean
    of its two views' pooled features. Every task inherits the protocol settings too."""

    # none | graph_contrastive | laplacian (ours) | graph_contrastive_reference | laplacian_reference (the authors')
    graph_loss: str = "none"
    graph_weight: float = 0.1
    graph_temperature: float = 0.1
    graph_path: str = "StringDB"  # a shipped annotation name, or a STRING / Hetionet / entity1,entity2 file
    graph_nodes: Optional[str] = None  # node table mapping ids to symbols (Hetionet nodes.tsv, STRING protein.info)
    # the shuffled-graph control: the dataset's genes trade names by this seed's permutation (docs/FEWSHOT.md)
    graph_shuffle_seed: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        from cellrep.knowledge.graph_loss import GRAPH_LOSSES

        if self.graph_loss not in GRAPH_LOSSES:
            raise CellrepError(f"unknown task.graph_loss '{self.graph_loss}'", fix=f"use one of {list(GRAPH_LOSSES)}")
        if self.graph_weight < 0 or self.graph_temperature <= 0:
            raise CellrepError(
                f"task.graph_weight={self.graph_weight} / task.graph_temperature={self.graph_temperature} out of range",
                fix="use graph_weight >= 0 and graph_temperature > 0 (0.1 in docs/FEWSHOT.md)",
            )


@dataclass
class TaskConfig(GraphPriorConfig):
    name: str = "supervised"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    label_smoothing: float = 0.0
    # a cellrep checkpoint or a published encoder (timm weights, OpenPhenom directory, DINOv2; docs/encoders.md)
    # whose weights start the backbone (keys checked exactly)
    init_from: Optional[str] = None
    # init_from's first convolution has other channels than the data: repeat | mean (docs/encoders.md); null: an error
    init_channels: Optional[str] = None
    monitor: str = "val/acc"  # the metric that picks checkpoints/best.ckpt
    monitor_mode: str = "max"
    # per-block linear probes of the backbone every N epochs while training (callbacks.block_probes); 0 = off:
    # a supervised run already reports val/acc, so the live curve is opt-in here
    probe_every_n_epochs: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_init_from(self.init_from)
        _check_channel_adaptation("task.init_channels", self.init_channels)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise CellrepError(f"task.label_smoothing={self.label_smoothing} is not in [0, 1]", fix="e.g. 0.1")


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
    # per-block linear probes every N epochs (callbacks.block_probes): MAE's val/loss says nothing about
    # which block is useful; 0 = off. Overhead at 5: docs/PERFORMANCE.md "Per-block probes while training"
    probe_every_n_epochs: int = 5

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


@dataclass
class DINOTaskConfig(GraphPriorConfig):
    """DINOv2-style self-distillation (task=dino); see cellrep.training.tasks.dino. The defaults are sized
    for the CPU recipe of docs; DINOv2's own value (ViT-L/14 on ImageNet) is in each comment."""

    name: str = "dino"
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(base_lr=5e-4, weight_decay=0.04))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(warmup_fraction=0.1))
    out_dim: int = 4096  # prototypes of the DINO head (DINOv2: 65536)
    head_hidden_dim: int = 512  # (DINOv2: 2048)
    head_bottleneck_dim: int = 128  # L2-normalized bottleneck before the prototypes (DINOv2: 256)
    head_layers: int = 3  # (DINOv2: 3)
    student_temp: float = 0.1  # (DINOv2: 0.1)
    teacher_temp: float = 0.07  # after warm-up (DINOv2: 0.07)
    warmup_teacher_temp: float = 0.04  # at the start (DINOv2: 0.04)
    teacher_temp_warmup_fraction: float = 0.3  # of all steps (DINOv2: 30 of 100 epochs)
    centering: str = "center"  # center: EMA centering (DINOv2's default) | sinkhorn: Sinkhorn-Knopp
    center_momentum: float = 0.9  # (DINOv2: 0.9)
    momentum_teacher: float = 0.992  # EMA momentum at the start, cosine to final (DINOv2: 0.992)
    final_momentum_teacher: float = 1.0  # (DINOv2: 1.0)
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])  # area fraction (DINOv2: 0.32, 1)
    local_crops: int = 4  # number of local crops (DINOv2: 8); 0 = global crops only
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])  # (DINOv2: 0.05, 0.32)
    local_crop_size: Optional[int] = None  # null: half data.crop_size on the patch grid (DINOv2: 96 of 224)
    koleo_weight: float = 0.1  # KoLeo regularizer on the student's class tokens (DINOv2: 0.1)
    ibot_weight: float = 0.0  # iBOT masked-patch loss; 0 = off (DINOv2: 1.0)
    ibot_mask_probability: float = 0.5  # share of global crops that get masked (DINOv2: 0.5)
    ibot_mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # of their patch tokens (DINOv2: 0.1, 0.5)
    ibot_separate_head: bool = False  # iBOT's own head instead of the DINO head (DINOv2: false)
    freeze_prototypes_fraction: float = 0.0  # prototypes get no gradient this first fraction (DINOv2: 1 of 100 epochs)
    # warn (after the LR warm-up) when the teacher's entropy gap or a feature std·√D falls below it
    collapse_threshold: float = 0.01
    compile: bool = False  # torch.compile every transformer block
    init_from: Optional[str] = None  # checkpoint whose encoder starts the student (keys checked exactly)
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    # per-block linear probes of the teacher every N epochs (callbacks.block_probes); 0 = off
    probe_every_n_epochs: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_init_from(self.init_from)
        _one_of("task.centering", self.centering, ["center", "sinkhorn"])
        for key in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers"):
            _at_least(f"task.{key}", getattr(self, key), 1)
        _at_least("task.local_crops", self.local_crops, 0)
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, key) <= 0:
                raise CellrepError(f"task.{key}={getattr(self, key)} must be positive", fix="DINOv2: 0.1 / 0.07 / 0.04")
        for key in ("koleo_weight", "ibot_weight"):
            _at_least(f"task.{key}", getattr(self, key), 0.0)
        for key in ("momentum_teacher", "final_momentum_teacher", "center_momentum", "ibot_mask_probability"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise CellrepError(f"task.{key}={getattr(self, key)} is not in [0, 1]", fix="e.g. 0.992, 1.0, 0.9, 0.5")
        for key in ("global_crops_scale", "local_crops_scale", "ibot_mask_ratio"):
            lo_hi = list(getattr(self, key))
            if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
                raise CellrepError(
                    f"task.{key}={lo_hi} is not a range [low, high] inside (0, 1]", fix="e.g. [0.32, 1.0]"
                )


@dataclass
class SimCLRTaskConfig(GraphPriorConfig):
    """SimCLR contrastive pretraining (task=simclr); see cellrep.training.tasks.simclr. SimCLR's own value
    (ResNet-50 on ImageNet, Chen et al. 2020) is in each comment where it differs."""

    name: str = "simclr"
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(base_lr=1e-3, weight_decay=1e-4))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(warmup_fraction=0.1))
    projector_hidden_dim: int = 2048  # Linear-BN-GELU-Linear projector (SimCLR: 2048, ReLU)
    projector_dim: int = 128  # where NT-Xent compares views (SimCLR: 128)
    temperature: float = 0.1  # NT-Xent temperature (SimCLR: 0.1 at large batches)
    crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])  # crop area fraction (SimCLR: 0.08, 1)
    # per-channel a·x + b, a in [1-s, 1+s], b in [-s, s] (normalized units); SimCLR's colour jitter for stains
    intensity_jitter: float = 0.2
    init_from: Optional[str] = None  # checkpoint whose encoder starts the backbone (keys checked exactly)
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    # per-block linear probes of the backbone every N epochs (callbacks.block_probes); 0 = off
    probe_every_n_epochs: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_init_from(self.init_from)
        for key in ("projector_hidden_dim", "projector_dim"):
            _at_least(f"task.{key}", getattr(self, key), 1)
        if self.temperature <= 0:
            raise CellrepError(f"task.temperature={self.temperature} must be positive", fix="SimCLR: 0.1")
        _at_least("task.intensity_jitter", self.intensity_jitter, 0.0)
        lo_hi = list(self.crops_scale)
        if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
            raise CellrepError(
                f"task.crops_scale={lo_hi} is not a range [low, high] inside (0, 1]", fix="e.g. [0.32, 1.0]"
            )


def _check_init_from(path: Optional[str]) -> None:
    from pathlib import Path

    if path is not None and not (Path(path).is_file() or (Path(path) / "config.json").is_file()):
        raise CellrepError(
            f"task.init_from: no checkpoint at {path}",
            fix="point it at a pretraining run's checkpoints/last.ckpt, a published encoder's weights file or "
            "release directory (docs/encoders.md), or drop task.init_from",
        )


def _check_channel_adaptation(key: str, value: Optional[str]) -> None:
    from cellrep.models.pretrained import CHANNEL_ADAPTATIONS

    if value is not None:
        _one_of(key, value, CHANNEL_ADAPTATIONS)


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
    # Lightning reads an int as a count of batches and a float as a fraction: Any keeps what was written
    # (a float field turned limit_train_batches=1 into 1.0, i.e. every batch)
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    val_check_interval: Any = None
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
# Evaluation: cellrep-probe and cellrep-eval (docs/benchmarks.md). Primary configs
# `probe.yaml` / `eval.yaml` use these as their schema; each benchmark in
# `benchmarks/` has its own node. Groups composed into them (data, split,
# logger, paths) keep their own schemas above.
# ---------------------------------------------------------------------------

# The benchmarks and corrections cellrep-eval knows: the one list of each, used by cellrep.eval.suite
# (unknown benchmarks) and cellrep.eval.batch_correction; the schema checks corrections=[...] at start.
BENCHMARKS = (
    "recall",
    "consistency",
    "dti",
    "classification",
    "map_activity",
    "map_consistency",
    "magnitude",
    "correction_scores",
)
CORRECTIONS = ("none", "pca_centerscale", "tvn", "sphering", "harmony")


@dataclass
class LoaderConfig:
    """The backbone pass over every site (not the probes' batches)."""

    batch_size: int = 64
    num_workers: int = 2

    def __post_init__(self) -> None:
        _at_least("loader.batch_size", self.batch_size, 1)
        _at_least("loader.num_workers", self.num_workers, 0)


@dataclass
class ProbeTrainingConfig:
    """The probes' schedule (docs/benchmarks.md); ``cellrep.eval.probe.ProbeSettings`` adds the seed."""

    lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])  # one probe per block and lr
    epochs: int = 30
    batch_size: int = 256
    weight_decay: float = 1e-4
    knn: bool = True  # also 1-nearest-neighbour (cosine) accuracy and macro-F1 per block (CHAMMI)
    # cellrep-probe: the best block's held-out top-1 with each channel removed (C more backbone passes;
    # cellrep.eval.channels, probe_channels.csv)
    leave_one_channel_out: bool = False

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
    # lower-tail fractions q of the recall-against-threshold plot: recall at (q, 1 - q) each; [] for none
    curve: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4])

    def __post_init__(self) -> None:
        bad_curve = [q for q in self.curve if not 0.0 < q < 0.5]
        if bad_curve:
            raise CellrepError(
                f"benchmarks.recall.curve {bad_curve}: each lower-tail fraction must be in (0, 0.5)",
                fix="use e.g. benchmarks.recall.curve=[0.01,0.05,0.1,0.2]",
            )
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
    knn: bool = True  # also 1-nearest-neighbour (cosine) accuracy and macro-F1 on the held-out wells


def _map_common(key: str, null_size: int, threshold: float) -> None:
    _at_least(f"{key}.null_size", null_size, 100)
    if not 0.0 < threshold < 1.0:
        raise CellrepError(f"{key}.threshold={threshold} is not in (0, 1)", fix=f"use e.g. {key}.threshold=0.05")


@dataclass
class MapActivityConfig:
    """copairs mAP of each perturbation's replicates against the negative controls (docs/benchmarks.md)."""

    null_size: int = 10000  # permutations of the copairs null per (positives, total) configuration
    threshold: float = 0.05  # retrieved: BH-corrected p below this
    pos_sameby: list[str] = field(default_factory=list)  # besides the perturbation label
    pos_diffby: list[str] = field(default_factory=lambda: ["plate_key"])  # replicates from other plates
    neg_sameby: list[str] = field(default_factory=lambda: ["plate_key"])  # controls of the query's plate
    neg_diffby: list[str] = field(default_factory=list)  # besides "is a control, other label"
    shuffled_baseline: bool = True

    def __post_init__(self) -> None:
        _map_common("benchmarks.map_activity", self.null_size, self.threshold)


@dataclass
class MapConsistencyConfig:
    """copairs mAP of perturbation-level profiles sharing a target or an annotated relationship."""

    sources: list[str] = field(default_factory=lambda: ["StringDB", "HuMAP", "Reactome"])
    targets: str = "auto"  # auto: the DTI table (benchmarks.dti.targets) when found, else target_column
    target_column: str = "target"  # metadata column of compound targets ("A|B" for several)
    positive_nM: float = 1000.0  # a DTI-table gene is a target at activity <= this
    dose: str = "highest"  # compound profile: its highest concentration, or all (mean over doses)
    include_genes: bool = True  # a compound and its target gene's profile are positives too
    max_profiles: int = 500  # per part; copairs' multilabel pairing is quadratic in the profiles
    null_size: int = 10000
    threshold: float = 0.05
    shuffled_baseline: bool = True

    def __post_init__(self) -> None:
        _map_common("benchmarks.map_consistency", self.null_size, self.threshold)
        _one_of("benchmarks.map_consistency.dose", self.dose, ("highest", "all"))
        _at_least("benchmarks.map_consistency.max_profiles", self.max_profiles, 3)


@dataclass
class MagnitudeConfig:
    """Energy distance of a perturbation's wells to the same batches' controls, permutation null."""

    null_samples: int = 1000
    alpha: float = 0.05
    max_controls: int = 200  # controls per batch used (a seeded subsample above this)

    def __post_init__(self) -> None:
        _at_least("benchmarks.magnitude.null_samples", self.null_samples, 10)
        _at_least("benchmarks.magnitude.max_controls", self.max_controls, 2)


@dataclass
class CorrectionScoresConfig:
    """Batch removal vs biology conserved per correction (Arevalo et al. 2024), docs/benchmarks.md."""

    batch_weight: float = 0.4  # overall = batch_weight·batch + (1 − batch_weight)·biology
    max_wells: int = 3000  # silhouettes, kNN graph and PCR on a seeded subsample of this many wells
    knn: int = 15  # neighbours of the graph-connectivity graph
    lisi_perplexity: float = 30.0  # iLISI: 3·perplexity neighbours, kernel entropy log(perplexity)
    pcr_components: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.batch_weight <= 1.0:
            raise CellrepError(
                f"benchmarks.correction_scores.batch_weight={self.batch_weight} is not in [0, 1]",
                fix="use e.g. benchmarks.correction_scores.batch_weight=0.4",
            )
        _at_least("benchmarks.correction_scores.max_wells", self.max_wells, 10)
        _at_least("benchmarks.correction_scores.knn", self.knn, 1)
        _at_least("benchmarks.correction_scores.lisi_perplexity", self.lisi_perplexity, 1)
        _at_least("benchmarks.correction_scores.pcr_components", self.pcr_components, 1)


@dataclass
class CorrectionConfig:
    """Settings of the batch corrections that have any (docs/benchmarks.md "Batch correction")."""

    sphering_reg: float = 0.01  # ZCA ridge, as a fraction of the mean control variance
    harmony_pcs: int = 50  # harmony runs on this many principal components of the center-scaled wells
    harmony_theta: float = 2.0  # diversity penalty (harmonypy's default)
    harmony_sigma: float = 0.1  # soft-clustering bandwidth (harmonypy's default); see docs for separated batches
    harmony_max_iter: int = 10

    def __post_init__(self) -> None:
        if self.sphering_reg <= 0:
            raise CellrepError(f"correction.sphering_reg={self.sphering_reg} must be > 0", fix="use e.g. 0.01")
        _at_least("correction.harmony_pcs", self.harmony_pcs, 2)
        _at_least("correction.harmony_max_iter", self.harmony_max_iter, 1)
        if self.harmony_sigma <= 0:
            raise CellrepError(f"correction.harmony_sigma={self.harmony_sigma} must be > 0", fix="use e.g. 0.1")


@dataclass
class PlotsConfig:
    """cellrep-eval's optional plots (docs/benchmarks.md "Plots")."""

    umap: bool = True  # UMAP of the well embeddings before and after each correction
    umap_max_wells: int = 2000  # a seeded subsample of this many wells (the same wells for every correction)
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    umap_metric: str = "cosine"
    color_by: str = "auto"  # biology colour: a metadata column, or auto (module, else target / gene, see docs)
    max_colors: int = 10  # the most frequent labels get a colour each, the rest are "other"

    def __post_init__(self) -> None:
        _at_least("plots.umap_max_wells", self.umap_max_wells, 10)
        _at_least("plots.umap_neighbors", self.umap_neighbors, 2)
        _at_least("plots.max_colors", self.max_colors, 1)


@dataclass
class ProbeRunConfig:
    """cellrep-probe: ``ckpt_path`` plus probe settings; data/split come from the training run."""

    ckpt_path: Optional[str] = None  # cellrep-probe: required, a checkpoint written by cellrep-train
    use_run_config: bool = True  # take data + split from <run>/config.yaml next to the checkpoint
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    progress: bool = True
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    probe: ProbeTrainingConfig = field(default_factory=ProbeTrainingConfig)
    task: dict[str, Any] = field(default_factory=lambda: {"name": "probe"})
    model: dict[str, Any] = field(default_factory=lambda: {"name": "checkpoint", "context_path": None})  # from the ckpt
    # a checkpoint trained with a cell-type context embeds with it (docs/FEWSHOT.md), its table from the run
    # or model.context_path=<csv> (new cell types: one row each); context=false: the encoder alone, an ablation
    context: bool = True
    data: Any = None
    split: Any = None
    logger: Any = None
    paths: Any = None
    trainer: Any = None  # trainer=ddp trainer.devices=N: embed on N ranks (cellrep.eval.ranks); null: one process
    run_name: Optional[str] = None  # a fixed run directory: re-running the same command resumes a killed embedding
    # embed with only these channels (names of the data's channel_names, or indices); null: all.
    # A CA-ViT drops the others, a fixed-channel model sees them as zeros (cellrep.eval.channels)
    channels: Optional[list[str]] = None
    # a published encoder instead of ckpt_path (docs/encoders.md): timm weights (.safetensors or a torch state
    # dict), an OpenPhenom release directory, DINOv2 weights; data and split then come from data=/split=
    encoder: Optional[str] = None
    encoder_model: Optional[str] = None  # the timm architecture of bare weights (resnet18, vit_small_patch16_224, ...)
    # the encoder's first convolution has other channels than the data: repeat | mean; null: an error
    encoder_channels: Optional[str] = None

    def __post_init__(self) -> None:
        if self.ckpt_path is not None and self.encoder is not None:
            raise CellrepError(
                "ckpt_path and encoder are both set", fix="pass ckpt_path=<cellrep checkpoint> or encoder=<published>"
            )
        _check_channel_adaptation("encoder_channels", self.encoder_channels)


@dataclass
class EvalRunConfig(ProbeRunConfig):
    """cellrep-eval: a checkpoint (``ckpt_path``) or an embeddings parquet (``embeddings``)."""

    embeddings: Optional[str] = None  # an embeddings parquet (metadata + feature_*) instead of a checkpoint
    metadata: Optional[str] = None  # a separate metadata table for `embeddings`, joined on join_on
    join_on: str = "well_id"
    rename: Any = (
        None  # {file column: canonical column}, e.g. {gene: perturbation} (Any: Hydra cannot merge into a None dict)
    )
    block: str = "best"  # an index, a block name, "last", or "best" (probe, or probe_results)
    probe_results: Optional[str] = None  # probe.json of a cellrep-probe run, for block=best
    corrections: list[str] = field(default_factory=lambda: ["none", "pca_centerscale", "tvn"])
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)  # sphering / harmony settings
    plots: PlotsConfig = field(default_factory=PlotsConfig)
    write_corrected: bool = True
    benchmarks: Any = None
    task: dict[str, Any] = field(default_factory=lambda: {"name": "eval"})

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if sum(x is not None for x in (self.ckpt_path, self.encoder, self.embeddings)) != 1:
            raise CellrepError(
                "cellrep-eval needs exactly one of ckpt_path=..., encoder=... and embeddings=...",
                fix="pass ckpt_path=<checkpoint>, encoder=<published encoder> (docs/encoders.md) or "
                "embeddings=<parquet with feature_* columns>",
            )


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
