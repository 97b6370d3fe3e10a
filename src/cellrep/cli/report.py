"""What a person reads at the end of a run or a sweep.

A run prints :func:`run_report`. A multirun's jobs are scanned by one function, :func:`collect`
(``<sweep dir>/<job>/metrics.json`` and the job's ``.hydra/overrides.yaml``), and read two ways:
``MultirunSummary`` (every sweep, ``conf/hydra/default.yaml``) prints each job's held-out accuracy
side by side; ``FewShotSummary`` (``experiment=kg_fewshot``) groups jobs by their overrides minus
``seed`` and writes mean ± sample std (ddof=1) over seeds to ``summary.md`` and ``summary.json``
(docs/FEWSHOT.md). Afterwards::

    python -m cellrep.cli.report <sweep dir>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cellrep.io import atomic_write_json, atomic_write_text

METRICS = ("zeroshot/acc", "test/acc", "test/acc_top5", "test/acc_top10")
IGNORED = ("seed", "run_name", "hydra.verbose")


def run_report(metrics: dict[str, Any]) -> str:
    """A few lines: held-out accuracy against chance, and where the outputs are."""
    split, n_cls = metrics["split"], metrics["num_classes"]
    lines = [f"cellrep: {metrics['model']} on {metrics['dataset']} ({n_cls} classes), split={split}"]
    if "test/acc" in metrics:
        lines.append(
            f"  held-out ({metrics['test_description']}): top-1 {metrics['test/acc']:.3f}, "
            f"top-5 {metrics.get('test/acc_top5', float('nan')):.3f}  (chance {1 / n_cls:.3f})"
        )
        for name, value in sorted(metrics.items()):
            if name.startswith("test/acc/"):
                lines.append(f"    {name.removeprefix('test/acc/'):>12}: top-1 {value:.3f}")
    if "val/acc" in metrics:
        lines.append(f"  validation (training experiments): top-1 {metrics['val/acc']:.3f}")
    lines.append(f"  outputs: {metrics['run_dir']}")
    return "\n".join(lines)


def collect(sweep_dir: Path) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(overrides as a dict, metrics) of every finished job under ``sweep_dir``, in job order."""
    jobs = []
    for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json"), key=lambda p: p.parent.name):
        overrides_file = metrics_file.parent / ".hydra" / "overrides.yaml"
        pairs = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        overrides = dict(str(o).split("=", 1) for o in pairs if "=" in str(o))
        jobs.append((overrides, {"job": metrics_file.parent.name, **json.loads(metrics_file.read_text())}))
    return jobs


def sweep_table(sweep_dir: Path) -> str | None:
    """One row per finished job of a multirun: its overrides and held-out accuracy."""
    rows = [
        (
            " ".join(f"{k}={v}" for k, v in overrides.items()) or m["job"],
            m.get("test/acc"),
            m.get("test/acc_top5"),
            1 / m["num_classes"],
        )
        for overrides, m in collect(sweep_dir)
    ]
    if not rows:
        return None
    width = max(len(r[0]) for r in rows)

    def fmt(v: float | None) -> str:
        return "   n/a" if v is None else f"{v:6.3f}"

    lines = [f"{'job':<{width}}  top-1   top-5   chance"]
    lines += [f"{o:<{width}}  {fmt(a)}  {fmt(a5)}  {fmt(c)}" for o, a, a5, c in rows]
    return "\n".join(lines)


def summarize(
    jobs: Sequence[tuple[dict[str, str], dict[str, Any]]], metrics: Sequence[str] = METRICS
) -> list[dict[str, Any]]:
    """One row per setting (overrides minus seed): n, and mean/std per metric."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for overrides, values in jobs:
        key = tuple(sorted((k, v) for k, v in overrides.items() if k.lstrip("+~") not in IGNORED))
        groups.setdefault(key, []).append(values)
    rows = []
    for key, members in sorted(groups.items()):
        row: dict[str, Any] = {"setting": dict(key), "n": len(members)}
        for m in metrics:
            vals = np.array([v[m] for v in members if v.get(m) is not None], dtype=float)
            if len(vals):
                row[m] = {
                    "mean": float(vals.mean()),
                    "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                    "values": vals.round(4).tolist(),
                }
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    """The rows as a Markdown table: varying overrides as columns, then mean ± std per metric."""
    if not rows:
        return "(no finished jobs)"
    keys = sorted({k for r in rows for k in r["setting"]})
    varying = [k for k in keys if len({r["setting"].get(k) for r in rows}) > 1] or keys
    present = [m for m in metrics if any(m in r for r in rows)]
    lines = ["| " + " | ".join([*varying, "n", *present]) + " |", "|" + "---|" * (len(varying) + 1 + len(present))]
    for r in rows:
        cells = [str(r["setting"].get(k, "")) for k in varying] + [str(r["n"])]
        cells += [f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}" if m in r else "" for m in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(sweep_dir: Path) -> str:
    rows = summarize(collect(sweep_dir))
    table = markdown(rows)
    atomic_write_json(Path(sweep_dir) / "summary.json", rows)
    atomic_write_text(Path(sweep_dir) / "summary.md", table + "\n")
    return table


class FewShotSummary(Callback):
    """Writes and prints the mean ± std table when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        print(f"\nmean ± std over seeds (sweep dir {sweep_dir}):\n{write_summary(sweep_dir)}")


class MultirunSummary(Callback):
    """Prints every job's held-out accuracy side by side when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        table = sweep_table(Path(config.hydra.sweep.dir))
        if table:
            print(f"\nheld-out accuracy per job (sweep dir {config.hydra.sweep.dir}):\n{table}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mean ± std over seeds of a cellrep multirun")
    parser.add_argument("sweep_dir", type=Path)
    print(write_summary(parser.parse_args(argv).sweep_dir))


if __name__ == "__main__":
    main()
