"""Every requested benchmark on every requested batch correction (docs/benchmarks.md).

A benchmark that does not apply to the data (no drug–target table, no
held-out split) is skipped with its reason recorded in the metrics and
printed; bad data (no replicates, annotations matching no gene) is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cellrep.errors import CellrepError
from cellrep.eval.batch_correction import correct
from cellrep.eval.classification import classification_benchmark, held_out_stage
from cellrep.eval.consistency import replicate_consistency
from cellrep.eval.dti import dti_benchmark, load_targets
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.probe import ProbeSettings
from cellrep.eval.recall import load_sources, recall_benchmark

log = logging.getLogger(__name__)
TARGETS_FILE = "compound_targets.csv"


@dataclass
class SuiteResult:
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # correction -> benchmark -> metrics
    skipped: dict[str, str] = field(default_factory=dict)  # benchmark -> why
    dti_per_compound: dict[str, pd.DataFrame] = field(default_factory=dict)  # correction -> table
    corrected: dict[str, Embeddings] = field(default_factory=dict)


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


def run_suite(
    emb: Embeddings,
    corrections: list[str],
    benchmarks: dict[str, dict],
    probe: ProbeSettings,
    targets: Path | None = None,
    targets_missing: str | None = None,
    progress: bool = True,
) -> SuiteResult:
    """``benchmarks``: name → its settings (``benchmarks.<name>`` of the eval config)."""
    out = SuiteResult()
    unknown = sorted(set(benchmarks) - {"recall", "consistency", "dti", "classification"})
    if unknown:
        raise CellrepError(
            f"unknown benchmark(s) {unknown}", fix="choose from recall, consistency, dti, classification"
        )
    if "dti" in benchmarks and targets is None:
        out.skipped["dti"] = targets_missing or "no drug-target table"
    if "classification" in benchmarks:
        try:
            held_out_stage(emb.meta)
        except CellrepError as exc:
            out.skipped["classification"] = exc.problem
    table = load_targets(targets) if "dti" in benchmarks and targets is not None else None
    sources = load_sources(list(benchmarks["recall"]["sources"])) if "recall" in benchmarks else {}
    for method in corrections:
        corrected = correct(emb, method)
        out.corrected[method] = corrected
        result: dict[str, Any] = {}
        for name, settings in benchmarks.items():
            if name in out.skipped:
                continue
            log.info("benchmark %s on %s embeddings", name, method)
            if name == "recall":
                thresholds = [tuple(float(v) for v in t) for t in settings["thresholds"]]
                result[name] = recall_benchmark(corrected, sources, thresholds)
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
        out.metrics[method] = result
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
