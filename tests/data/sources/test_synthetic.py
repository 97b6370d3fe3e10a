"""The synthetic screen: RxRx1 format, determinism, planted biology, batch effects, caching."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cellrep.data.sources.synthetic as synthetic
from cellrep.annotations import load_pairs
from cellrep.data.schema import NEGATIVE_CONTROL, RXRX1_CHANNELS
from cellrep.data.sources.rxrx1 import RxRx1Source
from cellrep.data.sources.synthetic import SyntheticScreenSpec, ensure_screen, generate_screen, spec_fingerprint
from cellrep.data.sources.synthetic_cells import Acquisition, morphology_mask, num_parameters, render_site
from cellrep.data.sources.synthetic_modules import plan_biology
from cellrep.errors import CellrepError

METADATA_COLUMNS = [
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
SMALL = dict(
    experiments_per_cell_type=2,
    plates_per_experiment=2,
    sites_per_well=1,
    image_size=32,
    num_modules=3,
    genes_per_module=3,
    num_compounds=2,
    concentrations=(0.1, 10.0),
    control_wells_per_plate=2,
    crispr_control_wells_per_plate=1,
    positive_controls=1,
    gene_groups=3,
)
# The default layout at a small image size: the layout is the default's, generating it takes seconds.
DEFAULT_LAYOUT = dict(image_size=24, sites_per_well=1)
# The layout before the realistic default (debug=tiny keeps it): every plate holds every gene.
SIMPLE = dict(
    plates_per_experiment=1,
    num_modules=6,
    control_wells_per_plate=4,
    crispr_control_wells_per_plate=0,
    positive_controls=0,
    gene_perturbation_type="siRNA",
    gene_groups=1,
    rotate_groups=False,
)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_site(root: Path, row, channels: int) -> np.ndarray:
    folder = root / "images" / row.experiment / f"Plate{row.plate}"
    return np.stack(
        [np.asarray(Image.open(folder / f"{row.well}_s{row.site}_w{c}.png")) for c in range(1, channels + 1)]
    )


@pytest.fixture(scope="module")
def default_screen(tmp_path_factory) -> Path:
    spec = SyntheticScreenSpec(**DEFAULT_LAYOUT)
    return generate_screen(spec, tmp_path_factory.mktemp("default") / "screen", progress=False)


@pytest.fixture(scope="module")
def default_record(default_screen) -> dict:
    return json.loads((default_screen / "generator.json").read_text())


def test_default_screen_is_in_rxrx1_format(default_screen, default_record):
    spec = SyntheticScreenSpec(**DEFAULT_LAYOUT)
    meta = pd.read_csv(default_screen / "metadata.csv", keep_default_na=False)
    assert list(meta.columns) == METADATA_COLUMNS
    assert len(meta) == default_record["num_sites"]
    assert sorted(meta["experiment"].unique()) == [f"{c}-0{i}" for c in ("HUVEC", "RPE") for i in range(1, 5)]
    for row in meta.itertuples():
        assert row.site_id == f"{row.experiment}_{row.plate}_{row.well}_{row.site}"
        assert row.well_id == f"{row.experiment}_{row.plate}_{row.well}"
        assert re.fullmatch(r"[B-O](0[2-9]|1\d|2[0-3])", row.well)
        assert row.cell_type == row.experiment.split("-")[0]
    for row in meta.sample(50, random_state=0).itertuples():
        for c in range(1, 7):
            assert (
                default_screen / "images" / row.experiment / f"Plate{row.plate}" / f"{row.well}_s{row.site}_w{c}.png"
            ).is_file()
    assert meta["site_id"].is_unique
    with Image.open(next((default_screen / "images").rglob("*_w3.png"))) as png:
        assert png.mode == "L" and png.size == (24, 24)
        assert np.asarray(png).dtype == np.uint8
    # whole experiments are held out, per cell type, like RxRx1's official split
    split = meta.groupby("experiment")["dataset"].agg(set)
    assert all(len(s) == 1 for s in split)
    assert split.map(lambda s: next(iter(s))).to_dict() == {
        **{f"HUVEC-0{i}": "train" for i in (1, 2, 3)},
        "HUVEC-04": "test",
        **{f"RPE-0{i}": "train" for i in (1, 2, 3)},
        "RPE-04": "test",
    }
    compounds = meta[meta["perturbation_type"] == "COMPOUND"]
    assert compounds["sirna"].nunique() == spec.num_compounds >= 10
    assert (compounds.groupby("sirna")["concentration"].nunique() >= 3).all()
    assert sorted(compounds["concentration"].astype(float).unique()) == list(spec.concentrations)
    assert (compounds["target"] != "").all()
    others = meta[meta["perturbation_type"] != "COMPOUND"]
    assert (others["concentration"] == "").all() and (others["target"] == "").all()
    assert default_record["spec"]["channel_names"] == list(RXRX1_CHANNELS)
    assert default_record["format_version"] == synthetic.FORMAT_VERSION
    # the reader accepts it as an RxRx1 dataset, and both control kinds stay negative controls
    source = RxRx1Source(default_screen)
    assert source.load(meta["site_id"].iloc[5]).shape == (6, 24, 24)
    read = source.metadata
    assert set(read["perturbation_type"]) == {"CRISPR", "COMPOUND", "control"}
    negative = read[read["well_type"] == "negative_control"]
    assert set(negative["perturbation"]) == {NEGATIVE_CONTROL, "CRISPR_control"}
    assert set(negative["perturbation_type"]) == {"control"}


def test_default_layout_is_a_realistic_screen(default_screen):
    """Several plates per experiment, ≥16 negative-control wells of two kinds and every positive control
    on every plate, and each gene on some plates and experiments only (batch effects do not cancel)."""
    meta = pd.read_csv(default_screen / "metadata.csv", keep_default_na=False)
    wells = meta.drop_duplicates("well_id")
    plates = wells.groupby(["experiment", "plate"])
    assert len(plates) == 8 * 3
    negative = wells[wells["well_type"] == "negative_control"]
    kinds = negative.groupby(["experiment", "plate"])["sirna"].value_counts().unstack()
    assert list(kinds.columns) == ["CRISPR_control", NEGATIVE_CONTROL] and len(kinds) == len(plates)
    assert (kinds >= 8).all().all() and (kinds.sum(axis=1) >= 16).all()
    positive = wells[wells["well_type"] == "positive_control"]
    assert positive["sirna"].nunique() >= 2 and set(positive["perturbation_type"]) == {"CRISPR"}
    assert (positive.groupby(["experiment", "plate"])["sirna"].nunique() == positive["sirna"].nunique()).all()
    genes = wells[(wells["perturbation_type"] == "CRISPR") & (wells["well_type"] == "treatment")]
    assert genes["sirna"].nunique() >= 100
    per_gene = genes.groupby("sirna")
    experiments, all_experiments = per_gene["experiment"].nunique(), meta["experiment"].nunique()
    assert (experiments < all_experiments).all() and (experiments >= 4).all()  # a subset, held-out ones included
    assert (per_gene.size() == experiments).all()  # one well per gene per experiment that holds it
    assert (per_gene["plate"].nunique() >= 2).all()  # on different plate slots in different experiments
    # genes share plates with only some of the others: no plate holds every gene
    assert (genes.groupby(["experiment", "plate"])["sirna"].nunique() < genes["sirna"].nunique() / 2).all()
    # every gene of a held-out experiment was seen in training experiments
    train = set(genes.loc[genes["dataset"] == "train", "sirna"])
    assert set(genes.loc[genes["dataset"] == "test", "sirna"]) <= train
    assert plates.size().max() <= SyntheticScreenSpec().wells_per_plate


def test_default_genes_cover_every_annotation_source(default_screen):
    """Relationship recall has enough annotated pairs among the screen's genes in each shipped source."""
    genes = set(pd.read_csv(default_screen / "modules.csv")["gene"])
    counts = {}
    for source in ("StringDB", "HuMAP", "Reactome"):
        pairs = load_pairs(source)
        counts[source] = int((pairs["gene_a"].isin(genes) & pairs["gene_b"].isin(genes)).sum())
    assert counts["StringDB"] >= 150 and counts["HuMAP"] >= 30 and counts["Reactome"] >= 30, counts


def test_generation_is_deterministic_per_seed(tmp_path):
    first = generate_screen(SyntheticScreenSpec(**SMALL), tmp_path / "a", progress=False)
    again = generate_screen(SyntheticScreenSpec(**SMALL), tmp_path / "b", progress=False)
    other = generate_screen(SyntheticScreenSpec(seed=1, **SMALL), tmp_path / "c", progress=False)
    assert tree_digest(first) == tree_digest(again)
    digest_other = tree_digest(other)
    changed = [k for k, v in tree_digest(first).items() if digest_other.get(k) != v]
    assert "metadata.csv" in changed and "modules.csv" in changed
    assert sum(k.endswith(".png") for k in changed) > 0


def test_modules_are_cliques_of_the_annotation_and_unlinked_to_each_other(default_screen, default_record):
    modules = pd.read_csv(default_screen / "modules.csv")
    assert list(modules.columns) == ["gene", "module"]
    assert modules.groupby("module")["gene"].apply(sorted).tolist() == default_record["modules"]
    assert modules["module"].value_counts().tolist() == [4] * 25
    assert modules["gene"].is_unique
    pairs = load_pairs("StringDB")
    annotated = set(zip(pairs["gene_a"], pairs["gene_b"]))
    module_of = dict(zip(modules["gene"], modules["module"]))
    genes = sorted(module_of)
    for i, a in enumerate(genes):
        for b in genes[i + 1 :]:
            assert ((a, b) in annotated) == (module_of[a] == module_of[b]), (a, b)
    meta = pd.read_csv(default_screen / "metadata.csv")
    treated = meta[(meta["perturbation_type"] == "CRISPR") & (meta["well_type"] == "treatment")]
    assert set(treated["sirna"]) == set(genes)


def test_compound_targets_match_the_planted_targets(default_screen, default_record):
    targets = pd.read_csv(default_screen / "compound_targets.csv")
    assert list(targets.columns) == ["compound", "gene", "activity_nM"]
    meta = pd.read_csv(default_screen / "metadata.csv")
    planted = meta[meta["perturbation_type"] == "COMPOUND"].groupby("sirna")["target"].agg(set)
    assert all(len(t) == 1 for t in planted)
    assert {c["name"]: c["target"] for c in default_record["compounds"]} == planted.map(min).to_dict()
    module_of = pd.read_csv(default_screen / "modules.csv").set_index("gene")["module"]
    for compound, rows in targets.groupby("compound"):
        target = min(planted[compound])
        potent = rows[rows["activity_nM"] <= 1000]
        assert potent["gene"].tolist() == [target]
        assert 10 <= potent["activity_nM"].iloc[0] <= 500
        grey = rows[(rows["activity_nM"] > 1000) & (rows["activity_nM"] <= 10000)]
        assert len(grey) >= 1 and (module_of[grey["gene"]] == module_of[target]).all()
        negatives = rows[rows["activity_nM"] > 10000]
        assert len(negatives) >= 20  # enough for the DTI benchmark's n = max(2·positives, 20)
        assert set(rows["gene"]) == set(module_of.index)


def test_planted_biology_modules_compounds_and_doses():
    """Module mates share a phenotype direction, a compound copies its target's, doses follow a Hill curve,
    and no phenotype moves a channel intensity (those stay cell type and batch)."""
    spec = SyntheticScreenSpec(**DEFAULT_LAYOUT)
    num_params = num_parameters(len(spec.channel_names))
    mask = morphology_mask(len(spec.channel_names))
    biology = plan_biology(spec, load_pairs(spec.annotation_source), num_params, np.random.default_rng(0), mask)
    shifts = np.array([biology.gene_shift[g] for g in biology.genes])
    assert not shifts[:, ~mask].any() and not np.array(list(biology.positive_shift.values()))[:, ~mask].any()
    unit = shifts / np.linalg.norm(shifts, axis=1, keepdims=True)
    module = np.repeat(np.arange(spec.num_modules), spec.genes_per_module)
    same, upper = module[:, None] == module[None], np.triu_indices(len(module), 1)
    cosine = (unit @ unit.T)[upper]
    assert cosine[same[upper]].mean() > cosine[~same[upper]].mean() + 0.4
    for compound in biology.compounds:
        target = biology.gene_shift[compound.target]
        top = biology.shift(compound.name, 1e4)
        assert top @ target / np.linalg.norm(top) / np.linalg.norm(target) > 0.85
        sizes = [np.linalg.norm(biology.shift(compound.name, c)) for c in spec.concentrations]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert not biology.shift(NEGATIVE_CONTROL, np.nan).any() and not biology.shift("CRISPR_control", np.nan).any()


def test_phenotypes_show_in_morphology_not_in_channel_intensity(tmp_path):
    """Sites of one strong perturbation vs negative controls, same plate and microscope: per-channel means
    match (within ~10 %, for these strongest phenotypes), while the cells' shapes differ (a mask of nuclei, Hoechst above its mean)."""
    spec = SyntheticScreenSpec(**DEFAULT_LAYOUT)
    num_channels, num_params = len(spec.channel_names), num_parameters(len(spec.channel_names))
    biology = plan_biology(
        spec, load_pairs(spec.annotation_source), num_params, np.random.default_rng(0), morphology_mask(num_channels)
    )
    scope = Acquisition.neutral(num_channels)
    rng = np.random.default_rng(1)

    def sites(shift: np.ndarray) -> np.ndarray:
        return np.stack([render_site(shift, num_channels, 48, scope, rng).astype(np.float32) for _ in range(40)])

    control = sites(np.zeros(num_params))
    for name in biology.positive_controls:
        treated = sites(biology.shift(name, np.nan))
        ratio = treated.mean(axis=(0, 2, 3)) / control.mean(axis=(0, 2, 3))
        assert np.abs(ratio - 1).max() < 0.15, ratio  # the 0-clip of dim background leaks a little
        shape = [((x[:, 0] > x[:, 0].mean(axis=(1, 2), keepdims=True)).mean(axis=(1, 2))) for x in (treated, control)]
        pixels = [np.abs(np.diff(x, axis=3)).mean(axis=(2, 3)) / x.std(axis=(2, 3)) for x in (treated, control)]
        differs = [abs(a.mean() - b.mean()) / np.sqrt(a.var() / len(a) + b.var() / len(b)) for a, b in [shape]]
        differs += [
            np.max(np.abs(a.mean(0) - b.mean(0)) / np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))) for a, b in [pixels]
        ]
        assert max(differs) > 4, (name, differs)


def test_batch_effects_change_the_same_perturbation_across_experiments(tmp_path):
    def control_means(strength: float) -> np.ndarray:
        spec = SyntheticScreenSpec(
            batch_effect_strength=strength,
            cell_types=("HUVEC",),
            **{**SMALL, "experiments_per_cell_type": 4, "control_wells_per_plate": 6},
        )
        root = generate_screen(spec, tmp_path / f"s{strength}", progress=False)
        meta = pd.read_csv(root / "metadata.csv")
        controls = meta[meta["perturbation_type"] == "control"]
        means = {
            e: np.mean([read_site(root, r, 6).mean((1, 2)) for r in rows.itertuples()], axis=0)
            for e, rows in controls.groupby("experiment")
        }
        return np.array(list(means.values()))  # experiments × channels

    with_batch, without_batch = control_means(1.0), control_means(0.0)
    spread_with = with_batch.std(axis=0) / with_batch.mean(axis=0)  # per channel, across experiments
    spread_without = without_batch.std(axis=0) / without_batch.mean(axis=0)
    assert spread_with.mean() > 0.1
    assert spread_with.mean() > 2 * spread_without.mean()


def test_plate_groups_hold_disjoint_genes_with_module_mates_apart(tmp_path):
    """gene_groups=2 (RxRx1-style): each plate holds one group, every gene is in every experiment once,
    module mates are spread over both groups, and plate 2 of every experiment is shifted the same way."""
    spec = SyntheticScreenSpec(
        **{
            **SMALL,
            **SIMPLE,
            "num_modules": 3,
            "control_wells_per_plate": 2,
            "num_compounds": 4,
            "plates_per_experiment": 2,
            "gene_groups": 2,
        }
    )
    root = generate_screen(spec, tmp_path / "screen", progress=False)
    meta = pd.read_csv(root / "metadata.csv")
    genes = meta[meta["perturbation_type"] == "siRNA"]
    plate_of = genes.groupby("sirna")["plate"].agg(set)
    assert (plate_of.map(len) == 1).all()  # a gene always sits on the same plate slot
    assert (genes.groupby("sirna")["experiment"].nunique() == meta["experiment"].nunique()).all()
    modules = pd.read_csv(root / "modules.csv")
    for _, members in modules.groupby("module"):
        assert {min(plate_of[g]) for g in members["gene"]} == {1, 2}  # mates on both plates
    compounds = meta[meta["perturbation_type"] == "COMPOUND"]
    assert len(compounds.groupby("sirna")) == 4
    assert all(plate_of[t] == {p} for t, p in zip(compounds["target"], compounds["plate"]))  # plated with target
    per_plate = meta.groupby(["experiment", "plate"])
    assert (per_plate["perturbation_type"].apply(lambda t: (t == "control").sum()) == 2).all()
    assert per_plate.size().max() <= spec.wells_per_plate
    assert len(meta) == 4 * (spec.num_genes + 4 * 2 + 2 * 2)  # 4 experiments: genes, 4 compounds × 2 doses, controls
    num_params = len(json.loads((root / "generator.json").read_text())["parameter_names"])
    assert not synthetic.slot_shift(spec, 1, num_params).any()
    shift = synthetic.slot_shift(spec, 2, num_params)
    assert np.linalg.norm(shift) == pytest.approx(spec.slot_drift)
    with pytest.raises(CellrepError, match="gene_groups"):
        SyntheticScreenSpec(**{**SMALL, **SIMPLE, "gene_groups": 2})  # one plate cannot hold two groups


def test_any_channel_count_works(tmp_path):
    for names in (("DNA",), ("DNA", "ER", "RNA", "AGP", "Mito")):
        spec = SyntheticScreenSpec(channel_names=names, **SMALL)
        root = generate_screen(spec, tmp_path / str(len(names)), progress=False)
        source = RxRx1Source(root, channel_names=names)
        assert source.load(source.metadata["site_id"].iloc[0]).shape == (len(names), 32, 32)


def test_ensure_screen_caches_by_fingerprint(tmp_path, capsys):
    spec = SyntheticScreenSpec(**SMALL)
    path = ensure_screen(spec, tmp_path, progress=False)
    assert path == tmp_path / spec_fingerprint(spec)
    before = tree_digest(path)
    stamp = (path / "metadata.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert ensure_screen(SyntheticScreenSpec(**SMALL), tmp_path, progress=False) == path
    assert "using cached synthetic screen at" in capsys.readouterr().out
    assert (path / "metadata.csv").stat().st_mtime_ns == stamp and tree_digest(path) == before
    assert spec_fingerprint(SyntheticScreenSpec(**{**SMALL, "effect_strength": 0.5})) != path.name
    assert spec_fingerprint(SyntheticScreenSpec(**{**SMALL, "concentrations": [0.1, 10]})) == path.name
    broken = tmp_path / spec_fingerprint(SyntheticScreenSpec(seed=7, **SMALL))
    broken.mkdir()
    with pytest.raises(CellrepError, match="not a complete synthetic screen"):
        ensure_screen(SyntheticScreenSpec(seed=7, **SMALL), tmp_path, progress=False)


def test_existing_output_is_never_overwritten(tmp_path):
    out = tmp_path / "screen"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CellrepError, match="refusing to overwrite"):
        generate_screen(SyntheticScreenSpec(**SMALL), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.render_site

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_site", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_screen(SyntheticScreenSpec(**SMALL), tmp_path / "screen", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad",
    [
        dict(sites_per_well=0),
        dict(cell_types=()),
        dict(cell_types=("HU_VEC",)),
        dict(channel_names=()),
        dict(image_size=8),
        dict(genes_per_module=1),
        dict(concentrations=(0.0, 1.0)),
        dict(effect_strength=-1),
        dict(num_modules=400, genes_per_module=4),
        dict(gene_groups=0),
        dict(gene_groups=5, plates_per_experiment=5),
        dict(gene_groups=13),  # 3 plates × 4 experiments cannot hold 13 rotating groups
        dict(gene_groups=3, rotate_groups=False, plates_per_experiment=2),
        dict(control_wells_per_plate=0, crispr_control_wells_per_plate=0),
        dict(positive_controls=-1),
        dict(gene_perturbation_type="shRNA"),
    ],
)
def test_bad_spec_is_rejected(bad):
    with pytest.raises(CellrepError):
        SyntheticScreenSpec(**bad)


def test_sparse_annotation_cannot_plant_modules(tmp_path):
    path = tmp_path / "tiny.csv"
    path.write_text("entity1,entity2\nA,B\nB,C\nA,C\nD,E\n")
    spec = SyntheticScreenSpec(annotation_source=str(path), **{**SMALL, "num_modules": 2})
    with pytest.raises(CellrepError, match="cliques"):
        generate_screen(spec, tmp_path / "screen", progress=False)
    assert not (tmp_path / "screen").exists()


def test_extreme_phenotypes_still_render_valid_images():
    """Strong effects saturate instead of breaking the drawing (no negative radii, empty ranges)."""
    from cellrep.data.sources.synthetic_cells import Acquisition, num_parameters, render_site

    rng = np.random.default_rng(0)
    size = num_parameters(4)
    for value in (-30.0, -6.0, 6.0, 30.0):
        for i in range(size):
            z = np.zeros(size)
            z[i] = value
            image = render_site(z, 4, 24, Acquisition.random(4, 3.0, rng), rng)
            assert image.shape == (4, 24, 24) and image.dtype == np.uint8
