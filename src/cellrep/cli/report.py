"""What a person reads at the end of a run or a sweep.

A run prints :func:`run_report`. A multirun's jobs are scanned by one function, :func:`collect`
(``<sweep dir>/<job>/metrics.json`` and the job's ``.hydra/overrides.yaml``), and read two ways:
``MultirunSummary`` (every sweep, ``conf/hydra/default.yaml``) prints each job's held-out accuracy
side by side; ``FewShotSummary`` (``experiment=kg_fewshot``, ``kg_ssl``) groups jobs by their overrides
minus ``seed`` and writes mean ± sample std (ddof=1) over seeds of the zero-shot, linear-probe and
fine-tuned accuracies, then the paired differences graph − none (:func:`paired`: per setting, the
two arms that differ only in ``task.graph_loss``, matched by seed; a shuffled-graph control,
``task.graph_shuffle_seed``, is compared with both), to ``summary.md`` and
``summary.json`` (docs/FEWSHOT.md). Afterwards::

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

# the de novo protocol's numbers (cellrep.training.fewshot): zero-shot (supervised only), linear probe, fine-tune
METRICS = (
    "zeroshot/acc",
    "linear/acc",
    "linear/acc_top5",
    "linear/acc_top10",
    "test/acc",
    "test/acc_top5",
    "test/acc_top10",
)
IGNORED = ("seed", "run_name", "hydra.verbose")
PAIRED = ("task.graph_loss", "none")  # the factor whose levels are compared with its baseline, seed by seed
# controls of the factor: a job that sets one is a level of its own ("graph_contrastive, graph_shuffle_seed=0"),
# compared with the baseline and with the same level without the control (real − shuffled)
CONTROLS = ("task.graph_shuffle_seed",)


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
    """(overrides as a dict, metrics) of every finished job under ``sweep_dir``, in job order: the jobs of
    one multirun (``<sweep_dir>/<job>/``) or of several run side by side (``<sweep_dir>/<multirun>/<job>/``,
    the Hydra jobs there: ``sweeps/fewshot_ssl.sh`` runs one multirun per core)."""
    root = Path(sweep_dir)
    files = [*root.glob("*/metrics.json")]
    files += [f for f in root.glob("*/*/metrics.json") if (f.parent / ".hydra").is_dir()]
    jobs = []
    for metrics_file in sorted(files, key=lambda p: p.parent.relative_to(root).parts):
        overrides_file = metrics_file.parent / ".hydra" / "overrides.yaml"
        pairs = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        overrides = dict(str(o).split("=", 1) for o in pairs if "=" in str(o))
        job = metrics_file.parent.relative_to(root).as_posix()
        jobs.append((overrides, {"job": job, **json.loads(metrics_file.read_text())}))
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


def _setting(overrides: dict[str, str], drop: Sequence[str] = ()) -> tuple:
    return tuple(sorted((k, v) for k, v in overrides.items() if k.lstrip("+~") not in (*IGNORED, *drop)))


def _stats(vals: np.ndarray) -> dict[str, Any]:
    return {
        "mean": float(vals.mean()),
        "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        "values": vals.round(4).tolist(),
    }


def summarize(
    jobs: Sequence[tuple[dict[str, str], dict[str, Any]]], metrics: Sequence[str] = METRICS
) -> list[dict[str, Any]]:
    """One row per setting (overrides minus seed): n, and mean/std per metric."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for overrides, values in jobs:
        groups.setdefault(_setting(overrides), []).append(values)
    rows = []
    for key, members in sorted(groups.items()):
        row: dict[str, Any] = {"setting": dict(key), "n": len(members)}
        for m in metrics:
            vals = np.array([v[m] for v in members if v.get(m) is not None], dtype=float)
            if len(vals):
                row[m] = _stats(vals)
        rows.append(row)
    return rows


def _arm_value(overrides: dict[str, str], values: dict[str, Any], key: str) -> str | None:
    """``key``'s value in a job: its override, else what the run recorded in ``metrics.json``'s ``arm``."""
    if key in overrides:
        return overrides[key]
    recorded = (values.get("arm") or {}).get(key.split(".")[-1])
    return None if recorded is None else str(recorded)


def paired(
    jobs: Sequence[tuple[dict[str, str], dict[str, Any]]],
    metrics: Sequence[str] = METRICS,
    factor: tuple[str, str] = PAIRED,
) -> list[dict[str, Any]]:
    """Per setting (overrides minus seed and the factor) and per level of the factor other than its baseline:
    level − baseline of every metric, paired by seed (only seeds both arms finished), mean/std over those
    seeds and ``helped``, the seeds where the difference is positive."""
    name, baseline = factor
    arms: dict[tuple, dict[str, dict[str, dict[str, Any]]]] = {}
    controlled: dict[str, str] = {}  # a control level → the level it controls
    for overrides, values in jobs:
        level, seed = _arm_value(overrides, values, name), _arm_value(overrides, values, "seed")
        if level is None or seed is None:
            continue
        controls = [f"{k.split('.')[-1]}={overrides[k]}" for k in CONTROLS if k in overrides]
        if controls and level != baseline:
            controlled[f"{level}, {', '.join(controls)}"] = level
            level = f"{level}, {', '.join(controls)}"
        arms.setdefault(_setting(overrides, drop=(name, *CONTROLS)), {}).setdefault(level, {})[seed] = values
    rows = []
    for key, levels in sorted(arms.items()):
        comparisons = [(level, baseline) for level in sorted(levels) if level != baseline]
        comparisons += [(controlled[c], c) for c in sorted(levels) if c in controlled]
        for level, base_level in comparisons:
            by_seed, base = levels.get(level, {}), levels.get(base_level, {})
            seeds = sorted(set(base) & set(by_seed), key=lambda s: (len(s), s))
            if not seeds:
                continue
            row: dict[str, Any] = {"setting": dict(key), "level": level, "baseline": base_level, "seeds": seeds}
            for m in metrics:
                both = [s for s in seeds if by_seed[s].get(m) is not None and base[s].get(m) is not None]
                if both:
                    diffs = np.array([by_seed[s][m] - base[s][m] for s in both], dtype=float)
                    row[m] = {**_stats(diffs), "n": len(both), "helped": int((diffs > 0).sum())}
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


def markdown_paired(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    """The paired differences as a Markdown table: varying settings, n, mean ± std per metric, and per
    top-1 metric the seeds where the level beat the baseline."""
    if not rows:
        return "(no seed finished both arms)"
    keys = sorted({k for r in rows for k in r["setting"]})
    varying = [k for k in keys if len({r["setting"].get(k) for r in rows}) > 1] or keys
    present = [m for m in metrics if any(m in r for r in rows)]
    top1 = [m for m in present if m.endswith("/acc")]
    header = [*varying, "level", "n", *present, *(f"seeds where it helped {m}" for m in top1)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["setting"].get(k, "")) for k in varying] + [f"{r['level']} − {r['baseline']}"]
        cells.append(str(len(r["seeds"])))
        cells += [f"{r[m]['mean']:+.3f} ± {r[m]['std']:.3f}" if m in r else "" for m in present]
        cells += [f"{r[m]['helped']} of {r[m]['n']}" if m in r else "" for m in top1]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(sweep_dir: Path) -> str:
    """``summary.md`` (and ``summary.json``): the mean ± std table, then the paired differences."""
    jobs = collect(sweep_dir)
    rows, pairs = summarize(jobs), paired(jobs)
    name, baseline = PAIRED
    text = markdown(rows)
    if pairs:
        text += f"\n\nPaired by seed, {name}: each level − {baseline}, and a level − its control (real − shuffled graph) (mean ± std over seeds):\n\n"
        text += markdown_paired(pairs)
    atomic_write_json(Path(sweep_dir) / "summary.json", {"settings": rows, "paired": pairs})
    atomic_write_text(Path(sweep_dir) / "summary.md", text + "\n")
    return text


class FewShotSummary(Callback):
    """Writes and prints the mean ± std table and the paired differences when a multirun ends."""

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
