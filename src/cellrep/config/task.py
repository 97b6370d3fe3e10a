"""Schemas of the task group: the optimizer and schedule, the few-shot protocol and graph prior every task
inherits, and each task's own settings (supervised, MAE, DINO, SimCLR)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cellrep.config.checks import at_least, fraction_range, one_of
from cellrep.errors import CellrepError


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # any timm optimizer name (adamw, lion, sgd, ...)
    base_lr: float = 1e-3  # learning rate at a global batch of 256; scaled linearly
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self) -> None:
        # torch refuses both when the optimizer is built, after the data is ready
        at_least("task.optimizer.base_lr", self.base_lr, 0.0)
        at_least("task.optimizer.weight_decay", self.weight_decay, 0.0)


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
        one_of("task.centering", self.centering, ["center", "sinkhorn"])
        for key in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers"):
            at_least(f"task.{key}", getattr(self, key), 1)
        at_least("task.local_crops", self.local_crops, 0)
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, key) <= 0:
                raise CellrepError(f"task.{key}={getattr(self, key)} must be positive", fix="DINOv2: 0.1 / 0.07 / 0.04")
        for key in ("koleo_weight", "ibot_weight"):
            at_least(f"task.{key}", getattr(self, key), 0.0)
        for key in ("momentum_teacher", "final_momentum_teacher", "center_momentum", "ibot_mask_probability"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise CellrepError(f"task.{key}={getattr(self, key)} is not in [0, 1]", fix="e.g. 0.992, 1.0, 0.9, 0.5")
        for key in ("global_crops_scale", "local_crops_scale", "ibot_mask_ratio"):
            fraction_range(f"task.{key}", getattr(self, key))


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
            at_least(f"task.{key}", getattr(self, key), 1)
        if self.temperature <= 0:
            raise CellrepError(f"task.temperature={self.temperature} must be positive", fix="SimCLR: 0.1")
        at_least("task.intensity_jitter", self.intensity_jitter, 0.0)
        fraction_range("task.crops_scale", self.crops_scale)


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
        one_of(key, value, CHANNEL_ADAPTATIONS)
