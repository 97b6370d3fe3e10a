"""Schemas of the data and split groups: the screen, its source (synthetic, TIFF plates), how it is split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from cellrep.config.checks import at_least, one_of
from cellrep.data.schema import RXRX1_CHANNELS
from cellrep.errors import CellrepError


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

        one_of("data.tiff.layout", self.layout, LAYOUTS)
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

        one_of("data.source", self.source, SOURCES)
        check_normalization(self.normalization)
        one_of("data.bit_depth_rule", self.bit_depth_rule, RULES)
        # each of these fails later anyway, but only after the screen was generated and sharded
        for key in ("batch_size", "crop_size", "samples_per_shard"):
            at_least(f"data.{key}", getattr(self, key), 1)
        at_least("data.num_workers", self.num_workers, 0)
        at_least("data.shard_parts", self.shard_parts, 1)
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
