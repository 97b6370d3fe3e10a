"""Cell-type modulation of the synthetic screen: off by default (the screen as before), and when on a
gene's phenotype differs between cell types while module mates stay as alike as planted."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

import cellrep.data.sources.synthetic as synthetic
from cellrep.config import to_schema
from cellrep.data.sources import synthetic_modules as planted
from cellrep.data.sources.synthetic import SyntheticScreenSpec, cell_type_transforms, generate_screen, spec_fingerprint
from cellrep.data.sources.synthetic_cells import morphology_mask
from cellrep.errors import CellrepError

# As tests/data/sources/test_synthetic.py's SMALL: 2 cell types × 2 experiments × 2 plates, 72 sites.
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
# Recorded with the generator before cell_type_modulation existed (commit 42fb5c9): the fingerprints of the
# default and the SMALL spec, and a digest of every SMALL site's morphology z (rounded to 1e-8, so that
# last-bit differences between BLAS builds do not count). The pixels are a fixed function of z.
PRE_FEATURE_FINGERPRINTS = {"default": "be964070485a", "small": "4e5ccde99390"}
PRE_FEATURE_SMALL_Z = "e7f3807ba6e71b350012af6a85a2419b207a586c619a1bf388f3f579fb1321df"
FOUR_TYPES = ("HUVEC", "RPE", "HepG2", "U2OS")


def _biology(spec: SyntheticScreenSpec) -> planted.Biology:
    return synthetic.plan_screen(spec).biology


def _site_z(spec: SyntheticScreenSpec) -> np.ndarray:
    return synthetic.latent_morphology(spec, synthetic.plan_screen(spec))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_off_by_default_the_screen_is_the_one_from_before_the_setting():
    assert SyntheticScreenSpec().cell_type_modulation == 0.0
    assert spec_fingerprint(SyntheticScreenSpec()) == PRE_FEATURE_FINGERPRINTS["default"]
    assert spec_fingerprint(SyntheticScreenSpec(**SMALL)) == PRE_FEATURE_FINGERPRINTS["small"]
    z = _site_z(SyntheticScreenSpec(**SMALL))
    assert hashlib.sha256((np.round(z, 8) + 0.0).tobytes()).hexdigest() == PRE_FEATURE_SMALL_Z
    assert all(t is None for t in cell_type_transforms(SyntheticScreenSpec(**SMALL)).values())


def test_modulation_changes_treated_sites_only(tmp_path):
    """End to end through the pixels: controls (no effect) render the same with and without modulation,
    every treated site changes."""
    spec_off, spec_on = SyntheticScreenSpec(**SMALL), SyntheticScreenSpec(**SMALL, cell_type_modulation=0.8)
    z_off, z_on = _site_z(spec_off), _site_z(spec_on)
    table = synthetic.plan_screen(spec_on).sites
    control = (table["perturbation_type"] == "control").to_numpy()
    assert np.array_equal(z_off[control], z_on[control])
    assert (np.abs(z_off[~control] - z_on[~control]).max(axis=1) > 1e-3).all()  # a low dose changes little
    # the rotation stays inside the phenotype parameters: it never moves a channel's intensity
    mask = morphology_mask(len(spec_on.channel_names))
    for t in cell_type_transforms(spec_on).values():
        assert not t[np.ix_(mask, ~mask)].any() and not t[np.ix_(~mask, mask)].any()

    off = generate_screen(spec_off, tmp_path / "off", progress=False)
    on = generate_screen(spec_on, tmp_path / "on", progress=False)
    for row in table.iloc[[int(np.flatnonzero(control)[0]), int(np.flatnonzero(~control)[0])]].itertuples():
        names = [f"images/{row.experiment}/Plate{row.plate}/{row.well}_s{row.site}_w{c + 1}.png" for c in range(6)]
        same = [(off / n).read_bytes() == (on / n).read_bytes() for n in names]
        assert all(same) if row.perturbation_type == "control" else not all(same), row.site_id


def test_a_gene_differs_across_cell_types_while_module_mates_stay_alike():
    """Planted effects at m = 0.8 over 4 cell types × 100 genes: the same gene in two cell types has a
    cosine of about 0.53 (a new phenotype), module mates keep exactly their cosine (about
    module_similarity = 0.6) in every cell type, and one gain scales every gene of a cell type."""
    spec = SyntheticScreenSpec(cell_types=FOUR_TYPES, cell_type_modulation=0.8)
    biology = _biology(spec)
    transforms = cell_type_transforms(spec)
    effect = {(g, c): transforms[c] @ biology.gene_shift[g] for g in biology.genes for c in FOUR_TYPES}
    type_pairs = list(itertools.combinations(FOUR_TYPES, 2))
    across = np.mean([_cos(effect[g, a], effect[g, b]) for g in biology.genes for a, b in type_pairs])
    assert 0.35 < across < 0.7, across

    mates = [pair for module in biology.modules for pair in itertools.combinations(module, 2)]
    planted_cos = np.array([_cos(biology.gene_shift[g], biology.gene_shift[h]) for g, h in mates])
    assert abs(planted_cos.mean() - spec.module_similarity) < 0.05
    for c in FOUR_TYPES:
        within = np.array([_cos(effect[g, c], effect[h, c]) for g, h in mates])
        np.testing.assert_allclose(within, planted_cos, atol=1e-9)
        gains = [np.linalg.norm(effect[g, c]) / np.linalg.norm(biology.gene_shift[g]) for g in biology.genes]
        np.testing.assert_allclose(gains, gains[0], rtol=1e-9)
    assert len({round(float(np.linalg.norm(transforms[c][:, 0])), 6) for c in FOUR_TYPES}) == len(FOUR_TYPES)


def test_the_change_grows_with_strength():
    means = []
    for strength in (0.4, 0.8, 1.2):
        spec = SyntheticScreenSpec(cell_types=FOUR_TYPES, cell_type_modulation=strength)
        shifts = np.stack(list(_biology(spec).gene_shift.values()))
        t = cell_type_transforms(spec)
        means.append(np.mean([_cos(t[a] @ x, t[b] @ x) for x in shifts for a, b in itertools.combinations(t, 2)]))
    assert means[0] > 0.8 and means[0] > means[1] > means[2] and means[2] < 0.35, means


def test_strength_enters_the_fingerprint():
    base = spec_fingerprint(SyntheticScreenSpec(**SMALL))
    on = spec_fingerprint(SyntheticScreenSpec(**SMALL, cell_type_modulation=0.8))
    assert on != base
    assert on != spec_fingerprint(SyntheticScreenSpec(**SMALL, cell_type_modulation=0.4))
    assert spec_fingerprint(SyntheticScreenSpec(**SMALL, cell_type_modulation=1)) == spec_fingerprint(
        SyntheticScreenSpec(**SMALL, cell_type_modulation=1.0)
    )


def test_the_setting_reaches_the_generator(make_cfg):
    from cellrep.data.shards.prepare import _synthetic_spec

    cfg = make_cfg("experiment=kg_fewshot", "data.synthetic.cell_type_modulation=0.8")
    assert to_schema(cfg)["data"].synthetic.cell_type_modulation == 0.8
    spec = _synthetic_spec(cfg.data)
    assert spec.cell_type_modulation == 0.8 and spec_fingerprint(spec) != spec_fingerprint(
        _synthetic_spec(make_cfg("experiment=kg_fewshot").data)
    )


@pytest.mark.parametrize("strength", [-0.1, 2.5, float("nan")])
def test_out_of_range_strength_is_refused(strength, make_cfg):
    with pytest.raises(CellrepError, match="cell_type_modulation"):
        SyntheticScreenSpec(cell_type_modulation=strength)
    with pytest.raises(CellrepError, match="cell_type_modulation"):
        to_schema(make_cfg(f"data.synthetic.cell_type_modulation={strength}"))
