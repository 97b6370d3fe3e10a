"""Mean ± std over seeds of a multirun's jobs (the de novo protocol's table, DESIGN §6).

Jobs are grouped by their command-line overrides minus ``seed`` (so every
other swept value — graph loss, shots — is a row); each metric is reported as
mean ± sample standard deviation (ddof=1) over the group's jobs, with n.

Used as a Hydra callback (``FewShotSummary``, set by ``experiment=kg_fewshot``:
writes ``summary.md`` and ``summary.json`` into the sweep directory at the
end of a multirun) or afterwards::

    python -m cellrep.cli.summary <sweep dir>
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


def collect(sweep_dir: Path) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(overrides as a dict, metrics) of every finished job under ``sweep_dir``."""
    jobs = []
    for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
        overrides_file = metrics_file.parent / ".hydra" / "overrides.yaml"
        pairs = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        overrides = dict(str(o).split("=", 1) for o in pairs if "=" in str(o))
        jobs.append((overrides, json.loads(metrics_file.read_text())))
    return jobs


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mean ± std over seeds of a cellrep multirun")
    parser.add_argument("sweep_dir", type=Path)
    print(write_summary(parser.parse_args(argv).sweep_dir))


if __name__ == "__main__":
    main()
