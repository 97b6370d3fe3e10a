"""Evaluation cost: every batch correction and benchmark stage of cellrep-eval at screen scale.

Issue 7 bar: on 20,000 wells × 1,024 features and ~5,000 genes, recall and
TVN finish in seconds, not minutes (vectorized). Uses the public functions of
:mod:`cellrep.eval` (``correct(..., "tvn")``, ``gene_embeddings``,
``cosine_matrix``, ``pair_recall``) on random features: 16 experiments, 5%
negative-control wells, 4 wells per gene, and 100,000 random annotated pairs
(the shipped annotation files are ~10⁴–10⁵ pairs). Each stage is timed
``--repeats`` times; the table shows medians. numpy uses its default threads.

Issue 14 stages, at their config defaults (docs/benchmarks.md), each once on the TVN-corrected wells
(cellrep-eval runs each benchmark once per correction): the corrections ``sphering`` and ``harmony``
(when harmonypy is installed), ``map_activity`` (copairs, null 10,000, shuffled baseline),
``map_consistency`` (gene relationships of the random pairs and compound targets, 500 profiles a
part), ``magnitude`` (energy distance, null 1,000, 200 controls per batch), ``correction_scores``
(the raw metrics of one correction on 3,000 wells, then the ranking), and the report's UMAP of 2,000
wells (umap-learn; its first call in a process includes numba's compilation, timed separately).
The screen has 5% compound wells (``--compound-share``; 5 wells per compound, one random target
gene each) so the target part of ``map_consistency`` runs too. ``--skip-new`` leaves these out;
``--quick`` runs them with small nulls and without the UMAP.

TVN is timed twice side by side: the current ``correct(emb, "tvn")`` (CORAL from
the SVD of each experiment's control rows) and the previous implementation, one
D×D ``eigh`` of each experiment's control covariance (kept here as the reference;
``--skip-old`` leaves it out). The largest absolute difference between the two
outputs is printed next to the table.

Issue 16 (part 6), ``--recall-curve``: ``recall_benchmark`` alone on gene maps of 1k–18k genes (and
more: ``--curve-genes``) × 256 features (``--curve-dim``), 4 wells per gene, three sources of 100,000 random pairs, at
the configured thresholds and the recall curve's (as cellrep-eval passes them). Each size runs in its
own subprocess, which reports wall and CPU seconds of the call and its peak RSS (``ru_maxrss``, the
whole process: interpreter, torch and the wells included; the RSS before the call is printed too).
``--with-before`` runs the previous implementation (full float64 G × G matrix, its upper triangle
sorted per source; kept here as the reference) in another subprocess per size, up to
``--before-max`` genes, and checks the two give identical results.

    python benchmarks/eval_cost.py [--quick]
    python benchmarks/eval_cost.py --recall-curve [--curve-genes 1000 5000 10000 18000] [--with-before]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cellrep  # noqa: F401, E402  (torchvision compat before lightning/timm)

# isort: split
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from _common import machine, median, table  # noqa: E402

from cellrep.eval.batch_correction import CORAL_RIDGE, center_scale, correct, inverse_sqrt, pca_fit  # noqa: E402
from cellrep.eval.embeddings import Embeddings  # noqa: E402
from cellrep.eval.recall import cosine_matrix, gene_embeddings, pair_recall  # noqa: E402


def screen(wells: int, dim: int, genes: int, experiments: int, seed: int = 0, compound_share: float = 0.0):
    rng = np.random.default_rng(seed)
    control = rng.random(wells) < 0.05
    names = np.array([f"G{i:05d}" for i in range(genes)])
    gene = names[rng.integers(0, genes, wells)]
    compound = ~control & (rng.random(wells) < compound_share / 0.95)
    n_compounds = max(1, int(compound.sum()) // 5)
    which = rng.integers(0, n_compounds, wells)
    targets = names[rng.integers(0, genes, n_compounds)]
    meta = pd.DataFrame(
        {
            "experiment": [f"E{i % experiments:02d}" for i in range(wells)],
            "perturbation": np.where(
                control, "EMPTY_control", np.where(compound, [f"CMP{j:04d}" for j in which], gene)
            ),
            "perturbation_type": np.where(control, "control", np.where(compound, "COMPOUND", "CRISPR")),
            "well_type": np.where(control, "negative_control", "treatment"),
            "target": np.where(compound, targets[which], ""),
        }
    )
    return Embeddings(meta, rng.standard_normal((wells, dim), dtype=np.float32))


def new_stages(emb: Embeddings, corrected: Embeddings, pairs: pd.DataFrame, timed, quick: bool, umap: bool) -> None:
    """Issue 14's corrections and benchmarks, each through its public function at the config defaults."""
    import tempfile
    from importlib.util import find_spec

    from cellrep.config import CorrectionScoresConfig, MagnitudeConfig, MapActivityConfig, MapConsistencyConfig
    from cellrep.eval import scores
    from cellrep.eval.batch_correction import CorrectionSettings
    from cellrep.eval.magnitude import magnitude_benchmark
    from cellrep.eval.map import map_activity, map_consistency

    ma, mc, mg, cs = MapActivityConfig(), MapConsistencyConfig(), MagnitudeConfig(), CorrectionScoresConfig()
    null = 200 if quick else ma.null_size
    timed("correction: sphering (ZCA on controls)", lambda: correct(emb, "sphering"))
    if find_spec("harmonypy") is not None:
        timed("correction: harmony (harmonypy, 50 PCs)", lambda: correct(emb, "harmony", CorrectionSettings()))
    with tempfile.TemporaryDirectory(prefix="cellrep-copairs-") as cache:
        timed(
            f"map_activity (copairs, null {null:,})",
            lambda: map_activity(corrected, null_size=null, threshold=ma.threshold, seed=0, cache_dir=cache),
        )
        res = timed(
            f"map_consistency (copairs, ≤{mc.max_profiles} profiles a part)",
            lambda: map_consistency(
                corrected,
                {"random": pairs},
                None,
                null_size=null,
                threshold=mc.threshold,
                max_profiles=mc.max_profiles,
                seed=0,
                cache_dir=cache,
            ),
        )
        assert "skipped" not in res.metrics, res.metrics
    timed(
        f"magnitude (energy distance, null {50 if quick else mg.null_samples:,})",
        lambda: magnitude_benchmark(
            corrected, null_samples=50 if quick else mg.null_samples, max_controls=mg.max_controls, seed=0
        ),
    )
    rows = timed("correction_scores: scored wells", lambda: scores.scored_wells(corrected, cs.max_wells, 0))
    raw = timed(
        f"correction_scores: raw metrics of one correction ({len(rows):,} wells)",
        lambda: scores.raw_scores(corrected, rows, cs.knn, cs.pcr_components, cs.lisi_perplexity),
    )
    timed("correction_scores: ranking", lambda: scores.correction_scores({"none": raw, "tvn": dict(raw)}))
    if umap:
        from cellrep.config import PlotsConfig
        from cellrep.eval.plots import umap_coordinates

        n = PlotsConfig().umap_max_wells
        timed("UMAP: first call (numba compilation, 100 wells)", lambda: umap_coordinates({"tvn": corrected}, 100))
        timed(f"UMAP of one correction ({n:,} wells)", lambda: umap_coordinates({"tvn": corrected}, n))


def tvn_eigh_per_experiment(emb: Embeddings) -> np.ndarray:
    """The previous TVN: identical up to the CORAL step, which did one D×D eigh per experiment."""
    x, batch, control = emb.features.astype(np.float64), emb.batch, emb.is_control
    z = center_scale(x, control)
    mean, axes = pca_fit(z[control])
    z = center_scale((z - mean) @ axes.T, control)
    ridge = CORAL_RIDGE * np.eye(z.shape[1])
    out = np.empty_like(z)
    for b in np.unique(batch):
        rows = batch == b
        cov = np.cov(z[rows & control], rowvar=False, ddof=1).reshape(z.shape[1], z.shape[1])
        out[rows] = z[rows] @ inverse_sqrt(cov + ridge)
    return out


def gene_map(genes: int, dim: int, wells_per_gene: int = 4, seed: int = 0) -> Embeddings:
    """Exactly ``genes`` genes, each with ``wells_per_gene`` random treatment wells (float32)."""
    rng = np.random.default_rng(seed)
    names = np.repeat([f"G{i:05d}" for i in range(genes)], wells_per_gene)
    meta = pd.DataFrame(
        {"experiment": "E00", "perturbation": names, "perturbation_type": "CRISPR", "well_type": "treatment"}
    )
    return Embeddings(meta, rng.standard_normal((len(names), dim), dtype=np.float32))


def recall_inputs(genes: int, dim: int):
    """The gene map, three random 100,000-pair sources, and the thresholds cellrep-eval passes."""
    from cellrep.config import RecallConfig

    cfg, rng = RecallConfig(), np.random.default_rng(1)
    names = np.array([f"G{i:05d}" for i in range(genes)])
    sources = {
        f"random{k}": pd.DataFrame({"gene_a": rng.choice(names, 100_000), "gene_b": rng.choice(names, 100_000)})
        for k in range(3)
    }
    thresholds = [tuple(t) for t in cfg.thresholds]
    thresholds += [t for t in ((q, round(1.0 - q, 12)) for q in cfg.curve) if t not in thresholds]
    return gene_map(genes, dim), sources, thresholds


def recall_before(emb: Embeddings, sources: dict, thresholds) -> dict:
    """The previous recall_benchmark: the float64 G × G matrix, and per source its upper triangle
    (triu_indices) sorted, then two searchsorted (docs/benchmarks.md, literally)."""
    from cellrep.eval.recall import threshold_key

    genes, x = gene_embeddings(emb)
    cos = cosine_matrix(x)
    out = {}
    for name, pairs in sources.items():
        index = pd.Index(genes)
        a, b = index.get_indexer(pairs["gene_a"]), index.get_indexer(pairs["gene_b"])
        keep = (a >= 0) & (b >= 0) & (a != b)
        ab = np.unique(np.stack([np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])], 1), axis=0)
        null = np.sort(cos[np.triu_indices(len(genes), k=1)])
        q = cos[ab[:, 0], ab[:, 1]]
        r_lo = np.searchsorted(null, q, side="right") / len(null)
        r_hi = np.searchsorted(null, q, side="left") / len(null)
        res = {"n_pairs": len(ab), "n_genes": len(genes), "n_null": len(null)}
        for lo, hi in thresholds:
            res[threshold_key(lo, hi)] = float(np.mean((r_lo <= lo) | (r_hi >= hi)))
        out[name] = res
    return out


def recall_point(genes: int, dim: int, before: bool) -> None:
    """One size, in this (fresh) process: one JSON line with seconds, RSS and the results."""
    import json
    import resource

    from cellrep.eval.recall import recall_benchmark

    emb, sources, thresholds = recall_inputs(genes, dim)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    res = (recall_before if before else recall_benchmark)(emb, sources, thresholds)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_before_mb": rss0 / 1024, "peak_mb": peak / 1024, "res": res}))


def recall_curve(sizes, dim: int, with_before: bool, before_max: int) -> None:
    import json
    import os
    import subprocess

    def run(genes: int, before: bool) -> dict:
        cmd = [sys.executable, __file__, "--recall-point", str(genes), "--dim", str(dim)]
        out = subprocess.run(cmd + (["--before"] if before else []), capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for genes in sizes:
        now = run(genes, False)
        old = run(genes, True) if with_before and genes <= before_max else None
        row = [f"{genes:,}", f"{now['res']['random0']['n_null']:,}", f"{now['wall']:.2f}", f"{now['cpu']:.2f}"]
        row += [f"{now['peak_mb']:,.0f}", f"{now['rss_before_mb']:,.0f}"]
        if old is not None:
            row += [f"{old['wall']:.2f}", f"{old['peak_mb']:,.0f}", "yes" if old["res"] == now["res"] else "**NO**"]
        elif with_before:
            row += ["", "", ""]
        rows.append(row)
        print(" | ".join(row), file=sys.stderr, flush=True)
    print(f"# machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"# recall_benchmark: 4 wells per gene × {dim} features, 3 sources × 100,000 random pairs, 9 thresholds")
    head = ["genes", "null cosines", "wall s", "CPU s", "peak RSS MB", "RSS before MB"]
    if with_before:
        head += ["before: wall s", "before: peak RSS MB", "identical"]
    print(table(head, rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recall-curve", action="store_true", help="recall_benchmark's seconds and peak RSS by genes")
    p.add_argument("--curve-genes", type=int, nargs="+", default=[1000, 5000, 10_000, 18_000])
    p.add_argument("--curve-dim", type=int, default=256, help="features of the --recall-curve gene maps")
    p.add_argument("--with-before", action="store_true", help="also run the previous full-matrix recall")
    p.add_argument("--before-max", type=int, default=18_000, help="largest gene count for --with-before")
    p.add_argument("--recall-point", type=int, help=argparse.SUPPRESS)  # one size, in a subprocess
    p.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--wells", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--genes", type=int, default=5000)
    p.add_argument("--experiments", type=int, default=16)
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--skip-old", action="store_true", help="do not time the previous (eigh) TVN")
    p.add_argument("--skip-new", action="store_true", help="do not time the issue-14 corrections and benchmarks")
    p.add_argument("--skip-umap", action="store_true", help="do not time the report's UMAP")
    p.add_argument("--compound-share", type=float, default=0.05)
    a = p.parse_args(argv)
    if a.recall_point is not None:
        return recall_point(a.recall_point, a.dim, a.before)
    if a.recall_curve:
        return recall_curve([200, 500] if a.quick else a.curve_genes, a.curve_dim, a.with_before, a.before_max)
    if a.quick:
        a.wells, a.dim, a.genes, a.experiments, a.pairs, a.repeats = 800, 16, 50, 4, 200, 1
    emb = screen(a.wells, a.dim, a.genes, a.experiments, compound_share=a.compound_share)
    rng = np.random.default_rng(1)
    names = np.array([f"G{i:05d}" for i in range(a.genes)])
    pairs = pd.DataFrame({"gene_a": rng.choice(names, a.pairs), "gene_b": rng.choice(names, a.pairs)})
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        cpu.setdefault(name, []).append(time.process_time() - c0)
        return out

    old = None
    for _ in range(a.repeats):
        if not a.skip_old:
            old = timed("TVN before: one eigh per experiment", lambda: tvn_eigh_per_experiment(emb))
        corrected = timed("TVN now (correct(emb, 'tvn'), SVD of control rows)", lambda: correct(emb, "tvn"))
        genes, x = timed("recall: gene means (gene_embeddings)", lambda: gene_embeddings(corrected))
        cos = timed("recall: gene×gene cosine (cosine_matrix)", lambda: cosine_matrix(x))
        res = timed("recall: null + pairs (pair_recall)", lambda: pair_recall(genes, cos, pairs))
        if not a.skip_new:
            new_stages(emb, corrected, pairs, timed, a.quick, umap=not (a.quick or a.skip_umap))
    rows = [[k, f"{median(v):.2f}", f"{median(cpu[k]):.2f}"] for k, v in times.items()]
    old_stages = [k for k in times if k.startswith(("TVN now", "recall:"))]
    added = [k for k in times if k not in old_stages and not k.startswith("TVN before")]
    for label, keys in (("**total (TVN now + recall)**", old_stages), ("**total (issue 14 stages)**", added)):
        if keys:
            rows.append(
                [label, f"{sum(median(times[k]) for k in keys):.2f}", f"{sum(median(cpu[k]) for k in keys):.2f}"]
            )
    print(f"# machine: {machine()}")
    print(
        f"# {a.wells:,} wells × {a.dim:,} features, {a.experiments} experiments, {len(genes):,} genes, "
        f"{res['n_pairs']:,} pairs present, null of {res['n_null']:,} cosines; median of {a.repeats}"
    )
    # CPU seconds (all threads of this process) next to wall seconds: on a shared machine the wall
    # clock also counts time spent waiting for a core
    print(table(["stage", "wall seconds", "CPU seconds"], rows))
    if old is not None:
        # both share the same PCA axes (same SVD call); float32 storage of the new output bounds the
        # agreement at ~1e-7 relative
        new = corrected.features.astype(np.float64)
        print(
            f"# max |TVN now − TVN before| = {np.abs(new - old).max():.2e} "
            f"(outputs' max |value| {np.abs(old).max():.1f}; the new one is stored as float32)"
        )


if __name__ == "__main__":
    main()
