"""The embedded default dataset: a small synthetic screen with known biology (docs/data.md).

It is written in the RxRx1 on-disk format (``images/<exp>/Plate<p>/<well>_s<site>_w<c>.png``
plus ``metadata.csv``), so the same reader, sharder and benchmarks run on it as on
real data, and every benchmark has a planted answer:

* genes are real annotated cliques (from a shipped annotation source), each
  module sharing a phenotype direction → relationship recall is meaningful;
* each compound copies its target gene's phenotype through a Hill dose response
  → ``compound_targets.csv`` is the ground truth of the DTI benchmark;
* phenotypes move morphology only (shape, size, texture, organelle arrangement,
  cell count), and every channel's mean and spread are fixed per site, so pooled
  intensity statistics cannot read them and a learned model must look at cells;
* experiments add microscope batch effects (focus, gamma, gain, illumination),
  a drift of their cells' size, density and texture, a batch × perturbation
  interaction; cell types shift the base morphology → batch splits are harder
  than random ones;
* with ``cell_type_modulation`` > 0, each cell type also scales and rotates every
  perturbation's phenotype by its own transform (:mod:`synthetic_modulation`): a
  held-out cell type shows genes in a new way, while module mates stay alike in each;
* the default layout is RxRx3-core-like: several plates per experiment, each
  holding one of several disjoint gene groups that rotate from experiment to
  experiment (so genes miss some experiments and change plate slot), 16
  negative controls of two kinds and the positive controls on every plate. Every
  plate position ("slot") adds a systematic morphology shift its controls share,
  which batch correction that learns from the controls (TVN) must undo.

Generation is deterministic: every random draw is keyed by (seed, what it is
for, name of the thing), never by generation order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

import cellrep
from cellrep.annotations import load_pairs, resolve_annotation_path
from cellrep.data.schema import NEGATIVE_CONTROL, RXRX1_CHANNELS, make_site_id
from cellrep.data.sources import synthetic_cells as cells
from cellrep.data.sources import synthetic_modulation as modulation
from cellrep.data.sources import synthetic_modules as planted
from cellrep.data.sources.synthetic_cells import (
    GLOBAL_PARAMS,
    Acquisition,
    morphology_mask,
    num_parameters,
    parameter_names,
    phenotype_weights,
    render_site,
)
from cellrep.errors import CellrepError

# 2: plate groups + plate-slot shift; all module mates in the grey zone.
# 3: morphology-only phenotypes, per-site fixed channel levels, gamma; rotated groups, two control kinds,
#    positive controls, experiment morphology drift.
FORMAT_VERSION = "synthetic-rxrx1/3"
GENE_PERTURBATION_TYPES = ("CRISPR", "siRNA")
COMPLETE_MARKER = "generator.json"  # written last: its presence means the screen is complete
# Inner wells of a 384-well plate, as RxRx1 uses (rows B–O, columns 2–23).
INNER_WELLS = tuple(f"{row}{col:02d}" for row in "BCDEFGHIJKLMNO" for col in range(2, 24))
# Noise that is neither perturbation nor batch: replicate wells and sites differ.
WELL_NOISE, SITE_NOISE = 0.2, 0.12
CELL_TYPE_SPREAD = 0.5  # how far cell types' base morphologies sit from each other
BATCH_DRIFT = 0.3  # biological drift per experiment (per unit batch_effect_strength)
PLATE_DRIFT = 0.1
# Batch × perturbation interaction (knock-down efficiency, local context): the same
# perturbation looks a little different in every experiment. A random split sees
# each experiment's version in training; a batch split must generalize past it.
INTERACTION = 0.6
# Batch × biology: each experiment expresses phenotypes through its own distortion
# (I + DISTORTION·G/√P) of morphology space (seeding density, serum lot...). A model
# learns an experiment's distortion from all of its wells when the experiment is in
# training (random split), and cannot when it is held out (batch split).
DISTORTION = 0.3
# Experiment morphology drift: seeding density, serum and passage change how big, how many and how
# textured the cells of a whole experiment are (per unit batch_effect_strength). The controls share it,
# so pixel normalization cannot remove it; a model that never saw the experiment must see past it.
EXPERIMENT_MORPHOLOGY_DRIFT = 0.8
EXPERIMENT_MORPHOLOGY_PARAMS = ("nucleus_size", "cell_density", "cytoplasm_ratio", "texture_scale", "membrane_width")
# Plate slot: plate p ≥ 2 of every experiment shifts morphology by a fixed vector of length
# ``spec.slot_drift`` (per unit batch_effect_strength) along these parameters, which per-plate control
# normalization of the pixels cannot undo. Plate 1 is the reference: one-plate screens see none.
SLOT_PARAMS = ("nucleus_size", "cell_density", "cytoplasm_ratio", "elongation", "texture_scale", "membrane_width")


@dataclass
class SyntheticScreenSpec:
    """Everything that determines a synthetic screen (its cache key is a hash of this)."""

    seed: int = 0
    cell_types: tuple[str, ...] = ("HUVEC", "RPE")
    experiments_per_cell_type: int = 4
    plates_per_experiment: int = 3
    sites_per_well: int = 3
    image_size: int = 40
    channel_names: tuple[str, ...] = RXRX1_CHANNELS
    num_modules: int = 25
    genes_per_module: int = 4
    annotation_source: str = "StringDB"
    num_compounds: int = 12
    concentrations: tuple[float, ...] = (0.1, 1.0, 10.0)
    control_wells_per_plate: int = 8  # EMPTY_control (untreated) wells per plate
    crispr_control_wells_per_plate: int = 8  # CRISPR_control (non-targeting guide) wells per plate
    positive_controls: int = 3  # strong-phenotype perturbations, one well each on every plate
    gene_perturbation_type: str = "CRISPR"  # or siRNA (RxRx1)
    effect_strength: float = 1.0  # scales every gene/compound phenotype
    batch_effect_strength: float = 1.0  # scales microscope effects and per-experiment drift
    module_similarity: float = 0.6  # cosine between phenotypes of two genes of one module
    gene_groups: int = 4  # ≥2: each plate holds one of these disjoint gene/compound groups (RxRx1 plate groups)
    rotate_groups: bool = True  # plate p of the k-th experiment of a cell type holds group (p-1+k) mod gene_groups
    slot_drift: float = 2.0  # length of the plate-slot morphology shift of plates ≥ 2 (per batch_effect_strength)
    cell_type_modulation: float = 0.0  # per-cell-type gain and rotation of phenotypes (synthetic_modulation); 0: off

    def __post_init__(self) -> None:
        # Hydra/YAML hand over lists; tuples keep the spec hashable and its hash stable.
        self.cell_types = tuple(str(c) for c in self.cell_types)
        self.channel_names = tuple(str(c) for c in self.channel_names)
        self.concentrations = tuple(float(c) for c in self.concentrations)
        self.cell_type_modulation = float(self.cell_type_modulation)  # 1 and 1.0 must hash alike
        modulation.check_strength(self.cell_type_modulation)
        positive = (
            "experiments_per_cell_type",
            "plates_per_experiment",
            "sites_per_well",
            "num_modules",
            "gene_groups",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise CellrepError(
                    f"synthetic screen: {name} must be >= 1, got {getattr(self, name)}",
                    fix=f"set data.synthetic.{name} to a positive integer",
                )
        checks = [
            (
                self.control_wells_per_plate + self.crispr_control_wells_per_plate >= 1,
                "a plate needs at least one negative-control well",
                "set control_wells_per_plate or crispr_control_wells_per_plate >= 1 (they anchor normalization)",
            ),
            (
                min(self.control_wells_per_plate, self.crispr_control_wells_per_plate, self.positive_controls) >= 0,
                "control well counts must be >= 0",
                "use 0 or more control wells",
            ),
            (
                self.gene_perturbation_type in GENE_PERTURBATION_TYPES,
                f"gene_perturbation_type {self.gene_perturbation_type!r} is not one of {list(GENE_PERTURBATION_TYPES)}",
                "use CRISPR (RxRx3-core) or siRNA (RxRx1)",
            ),
            (len(self.cell_types) >= 1, "cell_types is empty", "list at least one cell type"),
            (
                all(c and not set(c) & set("_/ ") for c in self.cell_types),
                f"cell type names {list(self.cell_types)} contain '_', '/' or spaces",
                "use names like HUVEC or HepG2 (they become experiment names HUVEC-01)",
            ),
            (len(self.channel_names) >= 1, "channel_names is empty", "list at least one channel"),
            (self.image_size >= 16, f"image_size {self.image_size} is below 16", "use image_size >= 16"),
            (self.genes_per_module >= 2, "genes_per_module must be >= 2", "a module needs two genes to relate"),
            (self.num_compounds >= 0, "num_compounds is negative", "use 0 or more compounds"),
            (
                self.num_compounds == 0 or len(self.concentrations) >= 1 and min(self.concentrations) > 0,
                "compounds need positive concentrations (µM)",
                "set concentrations, e.g. [0.1, 1.0, 10.0]",
            ),
            (
                min(self.effect_strength, self.batch_effect_strength, self.slot_drift) >= 0,
                "effect strengths must be >= 0",
                "use 0 (off) or a positive strength",
            ),
            (0.0 <= self.module_similarity <= 1.0, "module_similarity must be in [0, 1]", "use e.g. 0.6"),
            (
                self.gene_groups
                <= self.plates_per_experiment * (self.experiments_per_cell_type if self.rotate_groups else 1),
                f"gene_groups={self.gene_groups} exceeds the plates that can hold them "
                f"(plates_per_experiment={self.plates_per_experiment}"
                + (f" × experiments_per_cell_type={self.experiments_per_cell_type}" if self.rotate_groups else "")
                + "), so some genes would never be plated",
                "use fewer gene groups, more plates per experiment, or rotate_groups=true",
            ),
            (
                self.gene_groups <= self.genes_per_module,
                f"gene_groups={self.gene_groups} exceeds genes_per_module={self.genes_per_module}",
                "use gene_groups <= genes_per_module (module mates are spread over the groups)",
            ),
            (
                self.wells_per_plate <= len(INNER_WELLS),
                f"{self.wells_per_plate} wells per plate exceed the {len(INNER_WELLS)} inner wells of a 384 plate",
                "use fewer modules/genes/compounds/concentrations/control wells",
            ),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise CellrepError(f"synthetic screen: {problem}", fix=fix)

    @property
    def num_genes(self) -> int:
        return self.num_modules * self.genes_per_module

    @property
    def wells_per_plate(self) -> int:
        """Wells of the fullest possible plate (with gene groups, every compound could share one group)."""
        genes = -(-self.num_genes // self.gene_groups)
        controls = self.control_wells_per_plate + self.crispr_control_wells_per_plate + self.positive_controls
        return genes + self.num_compounds * len(self.concentrations) + controls


def _rng(seed: int, stream: str, *keys: object) -> np.random.Generator:
    """A generator keyed by names, so a draw never depends on what was drawn before it."""
    words = [zlib.crc32(str(k).encode()) for k in (stream, *keys)]
    return np.random.default_rng([int(seed), *words])


def _generator_constants() -> dict[str, float]:
    """Strengths fixed in code; part of the fingerprint so retuning them invalidates caches."""
    return dict(
        well_noise=WELL_NOISE,
        site_noise=SITE_NOISE,
        cell_type_spread=CELL_TYPE_SPREAD,
        batch_drift=BATCH_DRIFT,
        plate_drift=PLATE_DRIFT,
        interaction=INTERACTION,
        distortion=DISTORTION,
        experiment_morphology_drift=EXPERIMENT_MORPHOLOGY_DRIFT,
        effect_norm=planted.EFFECT_NORM,
        compound_target_cosine=planted.COMPOUND_TARGET_COSINE,
        hill_slope=planted.HILL_SLOPE,
        positive_control_norm=planted.POSITIVE_CONTROL_NORM,
        cell_brightness=cells.CELL_BRIGHTNESS,
        site_level_jitter=cells.SITE_LEVEL_JITTER,
        spread_per_level=cells.SPREAD_PER_LEVEL,
        spot_weight=cells.SPOT_WEIGHT,
        channel_texture_weight=cells.CHANNEL_TEXTURE_WEIGHT,
    )


def spec_fingerprint(spec: SyntheticScreenSpec) -> str:
    """Short hash of the spec, the format version, the code constants and the annotation file's content.

    Bump FORMAT_VERSION whenever drawing or layout code changes what a spec produces.
    ``cell_type_modulation`` and its constant enter only when it is on: at 0 the screen is the one from
    before the setting existed, and so is its fingerprint (existing caches stay valid).
    """
    annotation = hashlib.sha256(resolve_annotation_path(spec.annotation_source).read_bytes()).hexdigest()
    fields, constants = asdict(spec), _generator_constants()
    if spec.cell_type_modulation == 0:
        del fields["cell_type_modulation"]
    else:
        constants["modulation_gain_spread"] = modulation.GAIN_SPREAD
    payload = json.dumps(
        {"spec": fields, "format": FORMAT_VERSION, "constants": constants, "annotation": annotation},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def experiment_names(spec: SyntheticScreenSpec) -> list[tuple[str, str, str]]:
    """(experiment, cell_type, dataset) per experiment; the last quarter of each cell type is test.

    RxRx1's official split holds out whole experiments of every cell type; so does this.
    """
    out = []
    n = spec.experiments_per_cell_type
    n_test = max(1, round(n / 4)) if n >= 2 else 0
    for cell_type in spec.cell_types:
        for i in range(1, n + 1):
            out.append((f"{cell_type}-{i:02d}", cell_type, "test" if i > n - n_test else "train"))
    return out


def gene_group(spec: SyntheticScreenSpec, index_in_biology: int) -> int:
    """Plate group of the gene at ``index_in_biology``: member i of module m goes to group (m + i) mod G,
    so a module's genes are spread over every group (mates sit on different plates)."""
    module, member = divmod(index_in_biology, spec.genes_per_module)
    return (module + member) % spec.gene_groups


def plate_group(spec: SyntheticScreenSpec, experiment_index: int, plate: int) -> int:
    """Gene group of ``plate`` in the ``experiment_index``-th (0-based) experiment of its cell type.

    With ``rotate_groups`` the groups move by one plate per experiment. When there are more groups than
    plates, each experiment then holds only some groups, so every gene is missing from some experiments
    and sits on different plate slots in the others: batch and slot effects do not average out of a
    gene's mean, as in real screens (docs/data.md).
    """
    return (plate - 1 + (experiment_index if spec.rotate_groups else 0)) % spec.gene_groups


def _plate_wells(spec: SyntheticScreenSpec, biology: planted.Biology, group: int) -> list[dict]:
    """One plate's perturbations (before placement): its group's genes, both kinds of negative control,
    the positive controls, and the doses of the compounds whose target is in the group (a library plated
    by target family), so a compound and its target share a plate and the DTI benchmark measures
    biology, not plate."""
    gene_type = spec.gene_perturbation_type
    wells = [
        dict(
            sirna=g, sirna_id=i + 1, perturbation_type=gene_type, well_type="treatment", concentration=np.nan, target=""
        )
        for i, g in enumerate(biology.genes)
        if gene_group(spec, i) == group
    ]
    for j, compound in enumerate(biology.compounds):
        if gene_group(spec, biology.genes.index(compound.target)) != group:
            continue
        for conc in spec.concentrations:
            wells.append(
                dict(
                    sirna=compound.name,
                    sirna_id=spec.num_genes + j + 1,
                    perturbation_type="COMPOUND",
                    well_type="treatment",
                    concentration=conc,
                    target=compound.target,
                )
            )
    next_id = spec.num_genes + spec.num_compounds + 1
    for name, count in (
        (NEGATIVE_CONTROL, spec.control_wells_per_plate),
        (planted.CRISPR_CONTROL, spec.crispr_control_wells_per_plate),
    ):
        wells += [
            dict(
                sirna=name,
                sirna_id=next_id,
                perturbation_type="control",
                well_type="negative_control",
                concentration=np.nan,
                target="",
            )
            for _ in range(count)
        ]
        next_id += 1
    for k, name in enumerate(biology.positive_controls):
        wells.append(
            dict(
                sirna=name,
                sirna_id=next_id + k,
                perturbation_type=gene_type,
                well_type="positive_control",
                concentration=np.nan,
                target="",
            )
        )
    return wells


def _layout(spec: SyntheticScreenSpec, biology: planted.Biology) -> pd.DataFrame:
    """The full site table in RxRx1 columns (plus the synthetic extension columns)."""
    rows = []
    for position, (experiment, cell_type, dataset) in enumerate(experiment_names(spec)):
        experiment_index = position % spec.experiments_per_cell_type
        for plate in range(1, spec.plates_per_experiment + 1):
            wells = _plate_wells(spec, biology, plate_group(spec, experiment_index, plate))
            placement = _rng(spec.seed, "placement", experiment, plate).permutation(len(INNER_WELLS))
            addresses = sorted(INNER_WELLS[k] for k in placement[: len(wells)])
            order = _rng(spec.seed, "assignment", experiment, plate).permutation(len(wells))
            for address, k in zip(addresses, order):
                for site in range(1, spec.sites_per_well + 1):
                    rows.append(
                        dict(
                            site_id=make_site_id(experiment, plate, address, site),
                            well_id=f"{experiment}_{plate}_{address}",
                            cell_type=cell_type,
                            dataset=dataset,
                            experiment=experiment,
                            plate=plate,
                            well=address,
                            site=site,
                            **wells[k],
                        )
                    )
    columns = [
        "site_id",
        "well_id",
        "cell_type",
        "dataset",
        "experiment",
        "plate",
        "well",
        "site",
        "well_type",
        "sirna",
        "sirna_id",
        "perturbation_type",
        "concentration",
        "target",
    ]
    return pd.DataFrame(rows, columns=columns)


def cell_type_base(seed: int, cell_type: str, num_params: int) -> np.ndarray:
    """Base-morphology shift of every site of ``cell_type`` (also the synthetic context vector,
    :func:`cellrep.knowledge.context.synthetic_context`)."""
    return CELL_TYPE_SPREAD * _rng(seed, "cell_type", cell_type).standard_normal(num_params)


def slot_shift(spec: SyntheticScreenSpec, plate: int, num_params: int) -> np.ndarray:
    """Systematic shift of plate slot ``plate`` (the same in every experiment; zero for plate 1)."""
    shift = np.zeros(num_params)
    if plate > 1:
        index = [GLOBAL_PARAMS.index(name) for name in SLOT_PARAMS]
        direction = _rng(spec.seed, "slot", plate).standard_normal(len(index))
        shift[index] = spec.slot_drift * direction / np.linalg.norm(direction)
    return shift


def experiment_morphology(spec: SyntheticScreenSpec, experiment: str, num_params: int) -> np.ndarray:
    """Morphology drift of a whole experiment (cell size, density, texture), shared by its controls."""
    shift = np.zeros(num_params)
    index = [GLOBAL_PARAMS.index(name) for name in EXPERIMENT_MORPHOLOGY_PARAMS]
    shift[index] = EXPERIMENT_MORPHOLOGY_DRIFT * _rng(spec.seed, "experiment_morphology", experiment).standard_normal(
        len(index)
    )
    return shift


def cell_type_transforms(spec: SyntheticScreenSpec) -> dict[str, np.ndarray | None]:
    """Per cell type, the transform of its perturbation effects (``synthetic_modulation``; None when off)."""
    mask = morphology_mask(len(spec.channel_names))
    return {
        c: modulation.cell_type_transform(spec.cell_type_modulation, mask, _rng(spec.seed, "cell_type_modulation", c))
        for c in spec.cell_types
    }


def _site_morphology(
    spec: SyntheticScreenSpec,
    biology: planted.Biology,
    row,
    num_params: int,
    transforms: dict[str, np.ndarray | None],
) -> np.ndarray:
    """z of one site = cell type base + perturbation (through its cell type's transform, from
    :func:`cell_type_transforms`) + batch drift and interaction + well/site noise."""

    def normal(*keys: object) -> np.ndarray:
        return _rng(spec.seed, *keys).standard_normal(num_params)

    strength = spec.batch_effect_strength
    distortion = np.eye(num_params) + strength * DISTORTION / np.sqrt(num_params) * np.reshape(
        _rng(spec.seed, "distortion", row.experiment).standard_normal(num_params * num_params), (num_params, -1)
    )
    # Perturbations move morphology only: the distortion and the interaction would otherwise leak them
    # into the channel intensities, which stay cell type and batch (synthetic_cells.morphology_mask).
    mask = morphology_mask(len(spec.channel_names))
    z = cell_type_base(spec.seed, row.cell_type, num_params)
    effect = biology.shift(row.sirna, row.concentration)
    if transforms[row.cell_type] is not None:  # None: the unmodulated screen, its effects untouched
        effect = transforms[row.cell_type] @ effect
    z += mask * (distortion @ effect)
    z += strength * BATCH_DRIFT * normal("drift", row.experiment)
    z += strength * PLATE_DRIFT * normal("drift", row.experiment, row.plate)
    z += strength * slot_shift(spec, row.plate, num_params)
    z += strength * experiment_morphology(spec, row.experiment, num_params)
    if row.perturbation_type != "control":
        z += mask * strength * INTERACTION * normal("interaction", row.experiment, row.sirna)
    z += WELL_NOISE * normal("well", row.well_id) + SITE_NOISE * normal("site", row.site_id)
    return z


@dataclass(frozen=True)
class PlannedScreen:
    """A screen before any pixel: its biology, one row per site, and each cell type's effect transform."""

    biology: planted.Biology
    sites: pd.DataFrame
    transforms: dict[str, np.ndarray | None]


def plan_screen(spec: SyntheticScreenSpec) -> PlannedScreen:
    """What :func:`generate_screen` renders, without rendering it (benchmarks and tests read the planted truth)."""
    num_channels = len(spec.channel_names)
    biology = planted.plan_biology(
        spec,
        load_pairs(spec.annotation_source),
        num_parameters(num_channels),
        _rng(spec.seed, "biology"),
        phenotype_weights(num_channels),
    )
    return PlannedScreen(biology, _layout(spec, biology), cell_type_transforms(spec))


def latent_morphology(spec: SyntheticScreenSpec, planned: PlannedScreen) -> np.ndarray:
    """Sites × parameters: the latent morphology z each site's image is rendered from, in ``planned.sites`` order."""
    num_params = num_parameters(len(spec.channel_names))
    rows = planned.sites.itertuples(index=False)
    return np.stack([_site_morphology(spec, planned.biology, r, num_params, planned.transforms) for r in rows])


def _write_tables(out: Path, spec: SyntheticScreenSpec, biology: planted.Biology, table: pd.DataFrame) -> None:
    table.to_csv(out / "metadata.csv", index=False)
    biology.modules_table().to_csv(out / "modules.csv", index=False)
    biology.targets_table(_rng(spec.seed, "activities")).to_csv(out / "compound_targets.csv", index=False)


def generate_screen(spec: SyntheticScreenSpec, out_dir: Path, progress: bool = True) -> Path:
    """Write the screen described by ``spec`` to ``out_dir`` (which must not exist yet).

    Files go to a temporary sibling folder that is renamed into place when
    complete, so an interrupted run never leaves a half screen at ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise CellrepError(
            f"synthetic screen output {out_dir} already exists; refusing to overwrite it",
            fix="choose another directory, delete it, or use ensure_screen() to reuse a cache",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    num_channels, size = len(spec.channel_names), spec.image_size
    planned = plan_screen(spec)
    biology, table, transforms = planned.biology, planned.sites, planned.transforms
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        acquisitions = {
            e: Acquisition.random(num_channels, spec.batch_effect_strength, _rng(spec.seed, "scope", e))
            for e, _, _ in experiment_names(spec)
        }
        bar = tqdm(total=len(table), desc="synthetic screen", unit="site", disable=not progress)
        for (experiment, plate), sites in table.groupby(["experiment", "plate"], sort=False):
            plate_dir = tmp / "images" / experiment / f"Plate{plate}"
            plate_dir.mkdir(parents=True)
            for row in sites.itertuples(index=False):
                z = _site_morphology(spec, biology, row, num_parameters(num_channels), transforms)
                rng = _rng(spec.seed, "pixels", row.site_id)
                image = render_site(z, num_channels, size, acquisitions[experiment], rng)
                for c in range(num_channels):
                    Image.fromarray(image[c]).save(plate_dir / f"{row.well}_s{row.site}_w{c + 1}.png", format="PNG")
                bar.update(1)
        bar.close()
        _write_tables(tmp, spec, biology, table)
        record = {
            "format_version": FORMAT_VERSION,
            "fingerprint": spec_fingerprint(spec),
            "cellrep_version": cellrep.__version__,
            "spec": asdict(spec),
            "num_sites": len(table),
            "parameter_names": list(parameter_names(num_channels)),
            "experiments": [dict(experiment=e, cell_type=c, dataset=d) for e, c, d in experiment_names(spec)],
            "acquisition": {
                e: {k: np.asarray(v).round(6).tolist() for k, v in asdict(a).items()} for e, a in acquisitions.items()
            },
            "constants": _generator_constants(),
            **biology.describe(),
        }
        (tmp / COMPLETE_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache should be readable
        try:
            os.rename(tmp, out_dir)
        except OSError:
            raise CellrepError(
                f"synthetic screen output {out_dir} appeared while generating; not overwriting it",
                fix="another process wrote it; reuse it with ensure_screen() or delete it",
            ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_complete_screen(path: Path, fingerprint: str | None = None) -> bool:
    """True when ``path`` holds a finished screen (of ``fingerprint``, when given)."""
    marker = Path(path) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return fingerprint is None or record.get("fingerprint") == fingerprint


def ensure_screen(spec: SyntheticScreenSpec, cache_root: Path, progress: bool = True) -> Path:
    """Return ``cache_root/<fingerprint>``, generating the screen only if it is not there yet."""
    fingerprint = spec_fingerprint(spec)
    path = Path(cache_root) / fingerprint
    if is_complete_screen(path, fingerprint):
        print(f"using cached synthetic screen at {path}")
        return path
    if path.exists():
        raise CellrepError(
            f"{path} exists but is not a complete synthetic screen", fix=f"delete {path}; it will be regenerated"
        )
    if progress:
        print(f"generating synthetic screen at {path}")
    try:
        return generate_screen(spec, path, progress=progress)
    except CellrepError:
        if is_complete_screen(path, fingerprint):  # a concurrent run finished it first
            return path
        raise
