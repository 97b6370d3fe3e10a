"""What a person reads after ``cellrep-probe`` / ``cellrep-eval``: a console summary and ``report.md``.

Numbers always appear next to their baseline (chance accuracy, random-embedding
recall, random-score DTI), so a reader never has to know what "good" is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cellrep.io import atomic_write_text


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def probe_lines(table: pd.DataFrame, best: str, selected_on: str) -> list[str]:
    chance = float(table["chance"].iloc[0])
    lines = [
        f"linear probes per block (lr chosen on {selected_on}; chance {chance:.3f}):",
        f"  {'block':<12} {'dim':>5} {'lr':>7} {'val':>6} {'test top-1':>10} {'top-5':>6}",
    ]
    for r in table.itertuples():
        mark = "  <- best" if r.block == best else ""
        lines.append(
            f"  {r.block:<12} {r.dim:>5} {r.best_lr:>7.0e} {_f(r.val_acc):>6} {_f(r.test_acc):>10} "
            f"{_f(r.test_acc_top5):>6}{mark}"
        )
    return lines


def benchmark_lines(metrics: dict[str, dict], skipped: dict[str, str]) -> list[str]:
    lines = []
    for corr, result in metrics.items():
        lines.append(f"[{corr}]")
        for source, r in result.get("recall", {}).items():
            if "skipped" in r:
                lines.append(f"  recall {source}: skipped ({r['skipped']})")
                continue
            keys = [k for k in r if "/" in k]
            values = ", ".join(f"{k}: {_f(r[k])}" for k in keys)
            chance = "/".join(f"{float(k.split('/')[0]) + 1 - float(k.split('/')[1]):.2f}" for k in keys)
            lines.append(f"  recall {source} ({r['n_pairs']} pairs, {r['n_genes']} genes): {values}  (random {chance})")
        if "consistency" in result:
            c = result["consistency"]
            frac = next(v for k, v in c.items() if k.startswith("frac_p_lt_"))
            lines.append(
                f"  consistency: {_f(frac)} of {c['n_perturbations']} perturbations p<0.05, "
                f"median cosine {_f(c['median_cosine'])}"
            )
        if "dti" in result:
            d = result["dti"]["max"]
            lines.append(
                f"  dti ({result['dti']['n_compounds']} compounds, max over doses): median AP "
                f"{_f(d['ap']['median']['mean'])}±{_f(d['ap']['median']['std'])} vs random "
                f"{_f(d['random_ap']['median']['mean'])}±{_f(d['random_ap']['median']['std'])}; median AUC "
                f"{_f(d['auc']['median']['mean'])} vs {_f(d['random_auc']['median']['mean'])}"
            )
        if "classification" in result:
            c = result["classification"]
            extra = f", plate groups {_f(c['top1_plate_groups'])}" if "top1_plate_groups" in c else ""
            lines.append(
                f"  classification ({c['n_classes']} siRNAs, held-out wells {c['n_test_wells']}): top-1 "
                f"{_f(c['top1'])}, top-5 {_f(c['top5'])}{extra} (chance {_f(c['chance'])})"
            )
    for name, why in skipped.items():
        lines.append(f"skipped {name}: {why}")
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def write_markdown(
    path: Path,
    info: dict[str, Any],
    plots: dict[str, Path],
    probe: pd.DataFrame | None,
    best: str | None,
    metrics: dict[str, dict],
    skipped: dict[str, str],
) -> Path:
    """``report.md``: what was evaluated, the plots, and the numbers as tables."""
    md = ["# cellrep evaluation report", ""]
    md += [f"- **{k}**: {v}" for k, v in info.items()]
    md.append("")
    if probe is not None:
        md += [
            "## Linear probes per block",
            "",
            f"Best block (validation): **{best}**; chance {float(probe['chance'].iloc[0]):.3f}.",
            "",
        ]
        md += _md_table(
            ["block", "dim", "lr", "val", "held-out top-1", "top-5"],
            [
                [r.block, str(r.dim), f"{r.best_lr:g}", _f(r.val_acc), _f(r.test_acc), _f(r.test_acc_top5)]
                for r in probe.itertuples()
            ],
        )
        md.append("")
    for key, title in (
        ("probe", "Probe accuracy per block"),
        ("recall", "Recall per annotation source"),
        ("dti", "Zero-shot DTI: AP per compound vs random"),
    ):
        if key in plots:
            md += [f"![{title}]({Path(plots[key]).name})", ""]
    if metrics:
        md += ["## Benchmarks", "", "```", *benchmark_lines(metrics, skipped), "```", ""]
    md.append("All numbers are in `metrics.json`.")
    return atomic_write_text(path, "\n".join(md) + "\n")
