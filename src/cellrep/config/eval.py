"""Schemas of cellrep-probe and cellrep-eval (docs/benchmarks.md): the primary configs ``probe.yaml`` /
``eval.yaml`` and one node per benchmark in ``benchmarks/``; the groups composed into them (data, split,
logger, paths) keep their own schemas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from cellrep.config.checks import at_least, one_of
from cellrep.config.task import _check_channel_adaptation
from cellrep.errors import CellrepError

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
        at_least("loader.batch_size", self.batch_size, 1)
        at_least("loader.num_workers", self.num_workers, 0)


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
    at_least(f"{key}.null_size", null_size, 100)
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
        one_of("benchmarks.map_consistency.dose", self.dose, ("highest", "all"))
        at_least("benchmarks.map_consistency.max_profiles", self.max_profiles, 3)


@dataclass
class MagnitudeConfig:
    """Energy distance of a perturbation's wells to the same batches' controls, permutation null."""

    null_samples: int = 1000
    alpha: float = 0.05
    max_controls: int = 200  # controls per batch used (a seeded subsample above this)

    def __post_init__(self) -> None:
        at_least("benchmarks.magnitude.null_samples", self.null_samples, 10)
        at_least("benchmarks.magnitude.max_controls", self.max_controls, 2)


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
        at_least("benchmarks.correction_scores.max_wells", self.max_wells, 10)
        at_least("benchmarks.correction_scores.knn", self.knn, 1)
        at_least("benchmarks.correction_scores.lisi_perplexity", self.lisi_perplexity, 1)
        at_least("benchmarks.correction_scores.pcr_components", self.pcr_components, 1)


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
        at_least("correction.harmony_pcs", self.harmony_pcs, 2)
        at_least("correction.harmony_max_iter", self.harmony_max_iter, 1)
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
        at_least("plots.umap_max_wells", self.umap_max_wells, 10)
        at_least("plots.umap_neighbors", self.umap_neighbors, 2)
        at_least("plots.max_colors", self.max_colors, 1)


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
