"""Zero-shot DTI (docs/benchmarks.md) end to end on the RxRx3-core layout, with a planted answer.

A tiny RxRx3-core download is written in the real HuggingFace format (parquet
shards of ``__key__`` + one 8-bit JPEG 2000 per channel row, and
``metadata_rxrx3_core.csv`` with CRISPR guides, ``EMPTY_control`` /
``CRISPR_control`` and compounds with SMILES at RxRx3-core concentrations),
sharded by ``cellrep-shard``'s code path, embedded from the shards (block means
of each site, read through the index's byte offsets) and scored by
``cellrep-eval embeddings=...`` with a drug–target table. Each compound's
images are drawn from its targets' knockout phenotype (stronger at higher
dose), so the known targets must rank first: AP far above the random baseline.
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from real_formats.rxrx3_core import write_rxrx3_core

from cellrep.cli.evaluate import evaluate  # noqa: E402
from cellrep.data.shards.prepare import ensure_shards  # noqa: E402
from cellrep.data.shards.writer import load_manifest, read_index  # noqa: E402
from cellrep.eval.dti import dti_benchmark  # noqa: E402
from cellrep.eval.embeddings import aggregate_wells, read_embeddings  # noqa: E402

GENES = (
    "EGFR",
    "ERBB2",
    "BRAF",
    "MAP2K1",
    "MTOR",
    "PIK3CA",
    "AKT1",
    "CDK4",
    "CDK6",
    "PLK1",
    "AURKA",
    "AURKB",
    "JAK1",
    "JAK2",
    "ABL1",
    "SRC",
    "KIT",
    "FLT3",
    "ALK",
    "MET",
    "HDAC1",
    "HDAC2",
    "BRD4",
    "PARP1",
)
# compound -> (SMILES, targets ≤ 1000 nM, grey-zone genes 1000–10000 nM); every other gene measured inactive
COMPOUNDS = {
    "Erlotinib": ("COCCOc1cc2ncnc(Nc3cccc(C#C)c3)c2cc1OCCOC", ("EGFR",), ("ERBB2",)),
    "Sirolimus": ("CO[C@@H]1C[C@H](C[C@@H](C)[C@@H]2CC(=O)[C@H](C)/C=C(\\C)[C@@H](O)", ("MTOR",), ()),
    "Palbociclib": ("CC(=O)C1=C(C)c2cnc(Nc3ccc(cn3)N3CCNCC3)nc2N(C2CCCC2)C1=O", ("CDK4", "CDK6"), ()),
    "Ruxolitinib": ("N#CC[C@H](C1CCCC1)n1cc(cn1)-c1ncnc2[nH]ccc12", ("JAK1", "JAK2"), ("ABL1",)),
    "Mannitol": ("OC[C@@H](O)[C@@H](O)[C@H](O)[C@H](O)CO", (), ()),  # no target: skipped by the benchmark
}
CONCENTRATIONS = ("0.1", "1.0", "10.0")  # three of RxRx3-core's eight doses (µM)
DOSE_EFFECT = {"0.1": 0.35, "1.0": 0.7, "10.0": 1.0}
SIZE, BLOCK, CONTROLS = 16, 8, 12  # 16×16 sites; features = per-channel 2×2 block means; control wells per plate


def addresses():
    for row in "BCDEFGHIJKLMNOP":
        for col in range(2, 24):
            yield f"{row}{col:02d}"


def layout():
    """(wells in the fixture's tuple format, well -> phenotype weights over GENES)."""
    wells, weights = [], {}
    for exp, guide in (("gene-001", 1), ("gene-002", 2)):
        where = addresses()
        for g, gene in enumerate(GENES):
            wells.append((exp, 1, next(where), gene, f"{gene}_guide_{guide}", "", "", "CRISPR"))
            weights[wells[-1][:3]] = np.eye(len(GENES))[g]
        for _ in range(CONTROLS):
            wells.append((exp, 1, next(where), "EMPTY_control", "EMPTY_control", "", "", "CRISPR"))
    where = addresses()
    for name, (smiles, targets, _) in COMPOUNDS.items():
        for conc in CONCENTRATIONS:
            wells.append(("compound-001", 1, next(where), "", name, smiles, conc, "COMPOUND"))
            mix = np.isin(GENES, targets).astype(float)
            weights[wells[-1][:3]] = DOSE_EFFECT[conc] * mix / max(mix.sum(), 1.0)
    for control in ("CRISPR_control", "EMPTY_control"):
        for _ in range(CONTROLS // 2):
            wells.append(("compound-001", 1, next(where), "", control, "", "", "COMPOUND"))
    return wells, weights


def image_function(weights: dict):
    """key -> uint8 plane: base intensity + experiment offset + phenotype (2×2 blocks per channel) + noise."""
    rng = np.random.default_rng(5)
    phenotype = rng.normal(0.0, 1.0, (len(GENES), 6, 2, 2))
    offset = {e: rng.normal(0.0, 6.0, 6) for e in ("gene-001", "gene-002", "compound-001")}

    def image(key: str) -> np.ndarray:
        exp, plate, rest = key.split("/")
        address, _, channel = rest.split("_")
        c = int(channel) - 1
        well_rng = np.random.default_rng(zlib.crc32(f"{exp}/{address}".encode()))  # one draw per well
        w = weights.get((exp, int(plate[len("Plate") :]), address), np.zeros(len(GENES)))
        blocks = 110 + offset[exp][c] + 30 * np.tensordot(w, phenotype[:, c], axes=1)
        blocks = blocks + well_rng.normal(0.0, 2.0, (6, 2, 2))[c]  # well-to-well variation
        plane = np.kron(blocks, np.ones((BLOCK, BLOCK)))
        pixel_rng = np.random.default_rng(zlib.crc32(key.encode()))
        return np.clip(np.rint(plane + pixel_rng.normal(0.0, 6.0, plane.shape)), 0, 255).astype(np.uint8)

    return image


def targets_table() -> pd.DataFrame:
    rows = []
    for name, (_, positive, grey) in COMPOUNDS.items():
        for gene in GENES:
            nM = 10.0 if gene in positive else 3000.0 if gene in grey else 50000.0
            rows.append({"compound": name, "gene": gene, "activity_nM": nM})
    return pd.DataFrame(rows)


def site_features(shards_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Per-channel 2×2 block means of every sharded site, read at the index's byte offsets."""
    index = read_index(shards_dir)
    feats = []
    for row in index.itertuples():
        with open(shards_dir / row.shard, "rb") as f:
            f.seek(row.npy_offset)
            site = np.load(io.BytesIO(f.read(row.npy_size)))
        c, h, w = site.shape
        feats.append(site.reshape(c, 2, h // 2, 2, w // 2).mean(axis=(2, 4)).ravel())
    return np.stack(feats), index


def test_dti_ranks_planted_targets_on_rxrx3_core_shards(make_cfg, tmp_path):
    wells, weights = layout()
    root = write_rxrx3_core(
        tmp_path / "rxrx3-core", wells=wells, files=3, row_group_size=60, image=image_function(weights)
    )
    cfg = make_cfg("data=rxrx3_core", f"data.root={root}", f"data.shards_dir={tmp_path}/shards", config_name="shard")
    shards_dir = ensure_shards(cfg.data, progress=False).shards_dir
    manifest = load_manifest(shards_dir)
    assert manifest["num_samples"] == len(wells) and manifest["bad_input"]["count"] == 0
    assert manifest["image_shape"] == [6, SIZE, SIZE]

    features, sites = site_features(shards_dir)
    emb = aggregate_wells(features, sites)
    crispr = emb.meta[emb.meta["perturbation_type"] == "CRISPR"]
    assert set(crispr["perturbation"]) == set(GENES)  # <gene>_guide_<n> wells are their gene: two per gene
    assert (crispr.groupby("perturbation").size() == 2).all()
    compounds = emb.meta[emb.meta["perturbation_type"] == "COMPOUND"]
    assert sorted(compounds["concentration"].unique()) == [0.1, 1.0, 10.0] and compounds["smiles"].notna().all()
    assert (emb.meta["well_type"] == "negative_control").sum() == 3 * CONTROLS
    emb.write_parquet(tmp_path / "embeddings.parquet")
    targets_table().to_csv(tmp_path / "compound_targets.csv", index=False)

    eval_cfg = make_cfg(
        f"embeddings={tmp_path}/embeddings.parquet",
        "benchmarks=[dti]",
        f"benchmarks.dti.targets={tmp_path}/compound_targets.csv",
        "benchmarks.dti.seeds=20",
        "corrections=[none,pca_centerscale,tvn]",
        "progress=false",
        config_name="eval",
    )
    metrics = evaluate(eval_cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["benchmarks"] == json.loads(json.dumps(metrics["benchmarks"]))
    per_compound = pd.read_csv(tmp_path / "run" / "dti_per_compound_tvn.csv")
    assert set(per_compound["compound"]) == set(COMPOUNDS) - {"Mannitol"}

    for correction in ("pca_centerscale", "tvn"):
        dti = metrics["benchmarks"][correction]["dti"]
        assert dti["n_compounds"] == 4 and dti["n_genes"] == len(GENES)
        assert dti["skipped"] == {"no_positive": 1, "too_few_negatives": 0}
        for variant in ("max", "conc_10"):
            ap, random_ap = dti[variant]["ap"]["median"]["mean"], dti[variant]["random_ap"]["median"]["mean"]
            auc = dti[variant]["auc"]["median"]["mean"]
            assert ap > 0.9 and auc > 0.95, (correction, variant, dti[variant])
            assert random_ap < 0.4 and ap > random_ap + 0.5

    # the same corrected embeddings with each compound's targets swapped for another's: no better than random
    corrected = read_embeddings(tmp_path / "run" / "embeddings_tvn.parquet")
    names = [n for n in COMPOUNDS if COMPOUNDS[n][1]]
    swapped = targets_table().replace({"compound": dict(zip(names, names[1:] + names[:1]))})
    wrong = dti_benchmark(corrected, swapped, seeds=20, progress=False).metrics["max"]
    assert wrong["ap"]["median"]["mean"] < wrong["random_ap"]["median"]["mean"] + 0.15, wrong
