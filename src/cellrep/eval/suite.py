"""Every requested benchmark on every requested batch correction (docs/benchmarks.md).

A benchmark that does not apply to the data (no drug–target table, no
held-out split, no controls for map_activity, no targets or relationships for
map_consistency, one experiment for correction_scores) is skipped with its
reason recorded in the metrics and printed; bad data (no replicates,
annotations matching no gene) and a benchmark option naming a column that does
not exist are errors.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cellrep.config import BENCHMARKS
from cellrep.errors import CellrepError
from cellrep.eval import scores
from cellrep.eval.batch_correction import CorrectionSettings, correct
from cellrep.eval.classification import classification_benchmark, held_out_stage
from cellrep.eval.consistency import replicate_consistency
from cellrep.eval.dti import dti_benchmark, load_targets
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.knn import knn_metrics
from cellrep.eval.magnitude import magnitude_benchmark
from cellrep.eval.map import activity_columns, activity_skip_reason, check_columns, map_activity, map_consistency
from cellrep.eval.probe import ProbeSettings
from cellrep.eval.recall import load_sources, recall_benchmark, threshold_key
from cellrep.io import atomic_write_text

log = logging.getLogger(__name__)
TARGETS_FILE = "compound_targets.csv"


@dataclass
class SuiteResult:
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # correction -> benchmark -> metrics
    skipped: dict[str, str] = field(default_factory=dict)  # benchmark -> why
    dti_per_compound: dict[str, pd.DataFrame] = field(default_factory=dict)  # correction -> table
    corrected: dict[str, Embeddings] = field(default_factory=dict)
    # file stem -> table: map_activity_<correction>, map_consistency_<part>_<correction>, magnitude_<correction>,
    # correction_scores, recall_curve (written by write_tables)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def write_tables(self, out_dir: Path | str) -> dict[str, Path]:
        """Each table as ``<stem>.csv`` in ``out_dir``, and ``correction_ranking.png`` with correction scores."""
        out_dir = Path(out_dir)
        paths = {
            stem: atomic_write_text(out_dir / f"{stem}.csv", table.to_csv(index=False))
            for stem, table in self.tables.items()
        }
        if "correction_scores" in self.tables:
            paths["correction_ranking"] = scores.ranking_plot(
                self.tables["correction_scores"], out_dir / "correction_ranking.png"
            )
        return paths


def resolve_targets(setting: str, search: list[Path | None]) -> tuple[Path | None, str | None]:
    """(table path, None) or (None, why not): ``auto`` looks for compound_targets.csv in ``search``."""
    if setting != "auto":
        path = Path(setting).expanduser()
        if not path.is_file():
            raise CellrepError(
                f"drug-target table {path} does not exist",
                fix="set benchmarks.dti.targets to a CSV with columns compound,gene,activity_nM",
            )
        return path, None
    for folder in search:
        if folder is not None and (Path(folder) / TARGETS_FILE).is_file():
            return Path(folder) / TARGETS_FILE, None
    return None, (
        f"no drug-target table: none given and no {TARGETS_FILE} next to the data; "
        "set benchmarks.dti.targets=<csv compound,gene,activity_nM>"
    )


def _consistency_targets(setting: str, targets: Path | None) -> pd.DataFrame | None:
    """map_consistency's DTI table: ``auto`` = the suite's table (None: the metadata target column)."""
    if setting == "auto":
        return load_targets(targets) if targets is not None else None
    if setting in ("none", ""):
        return None
    return load_targets(setting)


def run_suite(
    emb: Embeddings,
    corrections: list[str],
    benchmarks: dict[str, dict],
    probe: ProbeSettings,
    targets: Path | None = None,
    targets_missing: str | None = None,
    progress: bool = True,
    correction_settings: dict | None = None,
) -> SuiteResult:
    """``benchmarks``: name → its settings (``benchmarks.<name>`` of the eval config);
    ``correction_settings``: the eval config's ``correction`` (sphering / harmony settings)."""
    out = SuiteResult()
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise CellrepError(f"unknown benchmark(s) {unknown}", fix=f"choose from {', '.join(BENCHMARKS)}")
    if "dti" in benchmarks and targets is None:
        out.skipped["dti"] = targets_missing or "no drug-target table"
    if "classification" in benchmarks:
        try:
            held_out_stage(emb.meta)
        except CellrepError as exc:
            out.skipped["classification"] = exc.problem
    if "map_activity" in benchmarks:
        settings = benchmarks["map_activity"]
        columns = activity_columns(emb.meta)
        for option in ("pos_sameby", "pos_diffby", "neg_sameby", "neg_diffby"):
            check_columns(f"benchmarks.map_activity.{option}", list(settings.get(option) or []), columns)
        if why := activity_skip_reason(emb.meta):
            out.skipped["map_activity"] = why
    if "magnitude" in benchmarks and not emb.is_control.any():
        out.skipped["magnitude"] = "no negative-control wells (well_type=negative_control) to measure against"
    if "correction_scores" in benchmarks and (why := scores.skip_reason(emb, list(corrections))):
        out.skipped["correction_scores"] = why
    table = load_targets(targets) if "dti" in benchmarks and targets is not None else None
    sources = load_sources(list(benchmarks["recall"]["sources"])) if "recall" in benchmarks else {}
    consistency_sources, consistency_table = {}, None
    if "map_consistency" in benchmarks:
        mc = benchmarks["map_consistency"]
        consistency_sources = load_sources(list(mc.get("sources") or []))
        consistency_table = _consistency_targets(str(mc.get("targets", "auto")), targets)
    settings_c = CorrectionSettings.from_dict(correction_settings, seed=probe.seed)
    score_rows = None
    if "correction_scores" in benchmarks and "correction_scores" not in out.skipped:
        cs = benchmarks["correction_scores"]
        score_rows = scores.scored_wells(emb, int(cs["max_wells"]), probe.seed)
    raw: dict[str, dict[str, float]] = {}
    curve_rows: list[dict] = []  # recall against threshold (benchmarks.recall.curve)
    with tempfile.TemporaryDirectory(prefix="cellrep-copairs-") as cache:  # copairs nulls, shared across corrections
        for method in corrections:
            corrected = correct(emb, method, settings_c)
            out.corrected[method] = corrected
            result: dict[str, Any] = {}
            for name, settings in benchmarks.items():
                if name in out.skipped or name == "correction_scores":
                    continue
                log.info("benchmark %s on %s embeddings", name, method)
                if name == "recall":
                    thresholds = [tuple(float(v) for v in t) for t in settings["thresholds"]]
                    curve = [(float(q), round(1.0 - float(q), 12)) for q in settings.get("curve") or []]
                    extra = [t for t in curve if t not in thresholds]
                    res = recall_benchmark(corrected, sources, [*thresholds, *extra])
                    drop = {threshold_key(*t) for t in extra}
                    result[name] = {s: {k: v for k, v in r.items() if k not in drop} for s, r in res.items()}
                    curve_rows += [
                        {
                            "correction": method,
                            "source": s,
                            "lower": lo,
                            "upper": hi,
                            "recall": r[threshold_key(lo, hi)],
                            "random": lo + 1.0 - hi,
                            "n_pairs": r["n_pairs"],
                        }
                        for s, r in res.items()
                        if "skipped" not in r
                        for lo, hi in curve
                    ]
                elif name == "consistency":
                    result[name] = replicate_consistency(
                        corrected, int(settings["null_samples"]), float(settings["alpha"]), seed=probe.seed
                    )
                elif name == "dti":
                    dti = dti_benchmark(
                        corrected,
                        table,
                        seeds=int(settings["seeds"]),
                        positive_nM=float(settings["positive_nM"]),
                        negative_nM=float(settings["negative_nM"]),
                        min_negatives=int(settings["min_negatives"]),
                        progress=progress,
                    )
                    result[name] = dti.metrics
                    out.dti_per_compound[method] = dti.per_compound
                elif name == "classification":
                    result[name] = classification_benchmark(
                        corrected, probe, bool(settings["plate_groups"]), progress=progress
                    )
                    if settings.get("knn", True):
                        sub = corrected.subset(corrected.genetic_mask())
                        result[name].update(
                            knn_metrics(
                                sub.features,
                                sub.meta["perturbation"].astype(str).to_numpy(),
                                held_out_stage(sub.meta),
                            )
                        )
                elif name == "map_activity":
                    res = map_activity(
                        corrected,
                        null_size=int(settings["null_size"]),
                        threshold=float(settings["threshold"]),
                        pos_sameby=list(settings["pos_sameby"]),
                        pos_diffby=list(settings["pos_diffby"]),
                        neg_sameby=list(settings["neg_sameby"]),
                        neg_diffby=list(settings["neg_diffby"]),
                        shuffled_baseline=bool(settings["shuffled_baseline"]),
                        seed=probe.seed,
                        cache_dir=cache,
                    )
                    result[name] = res.metrics
                    out.tables[f"map_activity_{method}"] = res.tables["map_activity"]
                elif name == "map_consistency":
                    res = map_consistency(
                        corrected,
                        consistency_sources,
                        consistency_table,
                        null_size=int(settings["null_size"]),
                        threshold=float(settings["threshold"]),
                        positive_nM=float(settings["positive_nM"]),
                        target_column=str(settings["target_column"]),
                        dose=str(settings["dose"]),
                        include_genes=bool(settings["include_genes"]),
                        shuffled_baseline=bool(settings["shuffled_baseline"]),
                        max_profiles=int(settings["max_profiles"]),
                        seed=probe.seed,
                        cache_dir=cache,
                    )
                    if "skipped" in res.metrics:  # the labels are the same for every correction
                        out.skipped[name] = res.metrics["skipped"]
                        continue
                    result[name] = res.metrics
                    out.tables.update({f"{stem}_{method}": t for stem, t in res.tables.items()})
                elif name == "magnitude":
                    metrics, per = magnitude_benchmark(
                        corrected,
                        null_samples=int(settings["null_samples"]),
                        alpha=float(settings["alpha"]),
                        max_controls=int(settings["max_controls"]),
                        seed=probe.seed,
                    )
                    result[name] = metrics
                    out.tables[f"magnitude_{method}"] = per
            if score_rows is not None:
                cs = benchmarks["correction_scores"]
                raw[method] = scores.raw_scores(
                    corrected,
                    score_rows,
                    int(cs["knn"]),
                    int(cs["pcr_components"]),
                    float(cs.get("lisi_perplexity", 30.0)),
                )
                if "map_activity" in result:
                    raw[method]["map_activity"] = float(result["map_activity"]["mean_map"])
            out.metrics[method] = result
    if curve_rows:
        out.tables["recall_curve"] = pd.DataFrame(curve_rows)
    if raw:
        ranked = scores.correction_scores(raw, float(benchmarks["correction_scores"]["batch_weight"]))
        out.tables["correction_scores"] = ranked
        for row in ranked.to_dict(orient="records"):
            method = row.pop("correction")
            out.metrics[method]["correction_scores"] = {
                k: (int(v) if k == "rank" else float(v)) for k, v in row.items() if v == v or k == "rank"
            }
    for name, why in out.skipped.items():
        log.warning("benchmark %s skipped: %s", name, why)
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``a/b/c`` keys (for loggers)."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
