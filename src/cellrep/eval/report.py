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


def channel_lines(table: pd.DataFrame) -> list[str]:
    """The leave-one-channel-out table (cellrep.eval.channels): held-out top-1 of one block's probe with
    each channel removed, and the change from all channels."""
    lines = [f"leave one channel out ({table['block'].iloc[0]}, held-out top-1):"]
    lines.append(f"  {'removed':<20} {'channels':>8} {'top-1':>6} {'change':>7}")
    for r in table.itertuples():
        lines.append(f"  {r.removed:<20} {r.channels:>8} {_f(r.test_acc):>6} {r.delta:>+7.3f}")
    return lines


def benchmark_lines(metrics: dict[str, dict], skipped: dict[str, str]) -> list[str]:
    """The console form of :func:`benchmark_rows`: one aligned row per number, one column per correction."""
    if not metrics:
        return [f"skipped {name}: {why}" for name, why in skipped.items()]
    header, rows = benchmark_rows(metrics)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return lines + [f"skipped {name}: {why}" for name, why in skipped.items()]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


# The plots of a cellrep-eval run (key = file stem in its run dir), in report order; the mission shows them too.
EVAL_PLOTS = (
    ("probe", "Probe accuracy per block"),
    ("recall", "Recall per annotation source"),
    ("recall_curve", "Recall against threshold, raw vs each correction"),
    ("dti", "Zero-shot DTI: AP per compound vs random"),
    ("map_activity", "Phenotypic activity: mAP against -log10 q per perturbation"),
    ("correction_ranking", "Batch corrections: batch removal vs biology conserved"),
    ("umap", "UMAP of well embeddings before and after each correction"),
)


def probe_rows(probe: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a per-block probe table: linear probe, and 1-NN when the probes ran it."""
    knn = "knn_top1" in probe.columns
    header = ["block", "dim", "lr", "val", "held-out top-1", "top-5", *(["1-NN top-1"] if knn else [])]
    rows = [
        [r.block, str(r.dim), f"{r.best_lr:g}", _f(r.val_acc), _f(r.test_acc), _f(r.test_acc_top5)]
        + ([_f(r.knn_top1)] if knn else [])
        for r in probe.itertuples()
    ]
    return header, rows


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
        md += _md_table(*probe_rows(probe))
        md.append("")
    for key, title in EVAL_PLOTS:
        if key in plots:
            md += [f"![{title}]({Path(plots[key]).name})", ""]
    if metrics:
        header, rows = benchmark_rows(metrics)
        md += ["## Benchmarks, raw and corrected", "", *_md_table(header, rows), ""]
        md += [f"- skipped {name}: {why}" for name, why in skipped.items()]
        md.append("")
    md.append("All numbers are in `metrics.json`.")
    return atomic_write_text(path, "\n".join(md) + "\n")


# --- cellrep-mission: the study's comparisons side by side (cellrep.cli.mission) ---------------------------------

RAW = "none"  # the correction that leaves embeddings as they are


def _label(correction: str) -> str:
    return "raw" if correction == RAW else correction


def _dti_summary(result: dict[str, Any]) -> dict[str, Any]:
    d = result["max"]
    return {
        "n_compounds": result.get("n_compounds"),
        "ap": d["ap"]["median"]["mean"],
        "ap_std": d["ap"]["median"]["std"],
        "random_ap": d["random_ap"]["median"]["mean"],
        "random_ap_std": d["random_ap"]["median"]["std"],
        "auc": d["auc"]["median"]["mean"],
        "random_auc": d["random_auc"]["median"]["mean"],
    }


def mission_comparisons(arms: dict[str, dict[str, Any]], evaluated: str, eval_metrics: dict[str, Any]) -> dict:
    """The papers' three comparisons as plain numbers (what ``metrics.json`` and the report's head show).

    ``arms``: arm name → its training ``metrics.json``; ``eval_metrics``: the evaluation's.
    - ``accuracy``: held-out top-1/top-5 per arm (each on its own split's test sites) and chance;
    - ``recall``: source → threshold → correction → recall, plus ``random`` (the two tails' share);
    - ``dti``: correction → median AP (max over doses) and the random-score AP on the same samples.
    """
    num_classes = arms[evaluated].get("num_classes")
    accuracy = {
        "arms": {
            name: {
                "split": m.get("split"),
                "test_description": m.get("test_description"),
                "top1": m.get("test/acc"),
                "top5": m.get("test/acc_top5"),
            }
            for name, m in arms.items()
        },
        "chance": 1.0 / num_classes if num_classes else None,
    }
    benchmarks = eval_metrics.get("benchmarks", {})
    recall: dict[str, dict[str, Any]] = {}
    dti: dict[str, Any] = {}
    for corr, result in benchmarks.items():
        for source, r in result.get("recall", {}).items():
            entry = recall.setdefault(source, {})
            if "skipped" in r:
                entry["skipped"] = r["skipped"]
                continue
            entry["n_pairs"] = r.get("n_pairs")
            for key in (k for k in r if "/" in k):
                lo, hi = (float(v) for v in key.split("/"))
                entry.setdefault(key, {"random": round(lo + 1 - hi, 6)})[corr] = r[key]
        if "dti" in result:
            dti[corr] = _dti_summary(result["dti"])
    skipped = eval_metrics.get("skipped", {})
    if not dti and "dti" in skipped:
        dti["skipped"] = skipped["dti"]
    return {"accuracy": accuracy, "recall": recall, "dti": dti, "evaluated_arm": evaluated}


def mission_head_lines(comparisons: dict[str, Any]) -> list[str]:
    """One line per comparison, the numbers side by side with their baseline (the report's first lines)."""
    acc = comparisons["accuracy"]
    arms = ", ".join(
        f"{name} ({a['test_description'] or a['split']}) {_f(a['top1'])}" for name, a in acc["arms"].items()
    )
    lines = [f"- held-out top-1 by split: {arms}; chance {_f(acc['chance'])}"]
    for source, entry in comparisons["recall"].items():
        if "skipped" in entry and len(entry) == 1:
            lines.append(f"- recall {source}: skipped ({entry['skipped']})")
            continue
        for key in (k for k in entry if "/" in k):
            values = " vs ".join(f"{_label(c)} {_f(v)}" for c, v in entry[key].items() if c != "random")
            lines.append(
                f"- recall {source} at {key} ({entry['n_pairs']} pairs): {values}; random {_f(entry[key]['random'])}"
            )
            break  # the first threshold here; every threshold is in the benchmark table
    dti = comparisons["dti"]
    if "skipped" in dti:
        lines.append(f"- zero-shot DTI: skipped ({dti['skipped']})")
    elif dti:
        n = next(iter(dti.values()))["n_compounds"]
        values = ", ".join(f"{_label(c)} {_f(d['ap'])} vs random {_f(d['random_ap'])}" for c, d in dti.items())
        lines.append(f"- zero-shot DTI median AP ({n} compounds, max over doses): {values}")
    return lines


def benchmark_rows(metrics: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): every benchmark number, one column per correction, then its baseline."""
    corrections = list(metrics)
    rows: dict[str, dict[str, str]] = {}

    def put(name: str, corr: str, value: Any, baseline: str = "") -> None:
        row = rows.setdefault(name, {"baseline": baseline})
        row[corr] = _f(value) if not isinstance(value, str) else value

    for corr, result in metrics.items():
        for source, r in result.get("recall", {}).items():
            if "skipped" in r:
                put(f"recall {source}", corr, "skipped")
                continue
            for key in (k for k in r if "/" in k):
                lo, hi = (float(v) for v in key.split("/"))
                put(f"recall {source} at {key} ({r['n_pairs']} pairs)", corr, r[key], f"random {lo + 1 - hi:.3f}")
        if "consistency" in result:
            c = result["consistency"]
            for key in (k for k in c if k.startswith("frac_p_lt_")):
                alpha = key.removeprefix("frac_p_lt_")
                put(f"consistency: share with p<{alpha}", corr, c[key], f"null {float(alpha):.3f}")
            put("consistency: median replicate cosine", corr, c["median_cosine"])
        if "dti" in result:
            d = _dti_summary(result["dti"])
            put(f"DTI median AP ({d['n_compounds']} compounds)", corr, d["ap"], f"random {_f(d['random_ap'])}")
            put("DTI median ROC AUC", corr, d["auc"], f"random {_f(d['random_auc'])}")
        if "classification" in result:
            c = result["classification"]
            put(f"classification top-1 ({c['n_classes']} classes)", corr, c["top1"], f"chance {_f(c['chance'])}")
            put("classification top-5", corr, c["top5"])
            if "top1_plate_groups" in c:
                put("classification top-1, plate groups assigned", corr, c["top1_plate_groups"])
            if "knn_top1" in c:
                put("classification 1-NN top-1 (cosine)", corr, c["knn_top1"], f"chance {_f(c['chance'])}")
        if "mean_map" in result.get("map_activity", {}):
            m = result["map_activity"]
            put(f"mAP activity ({m['n']} perturbations)", corr, m["mean_map"], f"shuffled {_f(m['shuffled_mean_map'])}")
            put(
                "mAP activity: share retrieved at q<0.05",
                corr,
                m["frac_retrieved"],
                f"shuffled {_f(m['shuffled_frac_retrieved'])}",
            )
        for part, m in result.get("map_consistency", {}).items():
            if isinstance(m, dict) and "mean_map" in m:  # parts are dicts; null_size/threshold are settings
                put(f"mAP consistency {part} ({m['n']})", corr, m["mean_map"], f"shuffled {_f(m['shuffled_mean_map'])}")
        if "median_energy" in result.get("magnitude", {}):
            m = result["magnitude"]
            frac = next(k for k in m if k.startswith("frac_p_lt_"))
            put(f"magnitude: share with p<{frac.removeprefix('frac_p_lt_')}", corr, m[frac])
        if "overall" in result.get("correction_scores", {}):
            m = result["correction_scores"]
            put("correction score: batch removal", corr, m["batch"])
            put("correction score: biology conserved", corr, m["biology"])
            put("correction score: overall (0.4·batch + 0.6·biology)", corr, m["overall"])
    header = ["benchmark", *(_label(c) for c in corrections), "baseline"]
    return header, [[name, *(r.get(c, "") for c in corrections), r["baseline"]] for name, r in rows.items()]


def write_mission_markdown(
    path: Path,
    head: list[str],
    metrics: dict[str, Any],
    probe: pd.DataFrame | None,
    baseline: dict[str, Any] | None,
    plots: dict[str, Path],
) -> Path:
    """The mission's ``report.md``: the comparisons first, then the probe table (with the intensity
    baseline row), every benchmark per correction, the plots and where each step's outputs are."""
    root = Path(path).parent
    md = [f"# cellrep mission: {metrics.get('model')} on {metrics.get('dataset')} (seed {metrics.get('seed')})", ""]
    md += [*head, ""]
    if "comparisons" in plots:
        md += [f"![comparisons]({Path(plots['comparisons']).relative_to(root)})", ""]
    md += [f"## Linear probes per block ({metrics.get('evaluate_arm')} model)", ""]
    if probe is not None and len(probe):
        best = metrics["probe"]["best_block"]
        header, rows = probe_rows(probe)
        for row in rows:
            row[0] = f"**{row[0]}**" if row[0] == best else row[0]
        if baseline:
            rows.append(
                [
                    "intensity statistics (baseline)",
                    str(baseline["dim"]),
                    f"{baseline['best_lr']:g}",
                    _f(baseline["val_acc"]),
                    _f(baseline["test_acc"]),
                    _f(baseline["test_acc_top5"]),
                ]
                + [""] * (len(header) - 6)
            )
        md += [
            f"Best block (validation): **{best}**, used for the embeddings; chance "
            f"{float(probe['chance'].iloc[0]):.3f}. The baseline row probes per-channel mean and std per site "
            "in units of the plate's negative controls.",
            "",
            *_md_table(header, rows),
            "",
        ]
    else:
        md += ["(no probe: the evaluation did not run with block=best)", ""]
    if metrics.get("benchmarks"):
        header, rows = benchmark_rows(metrics["benchmarks"])
        md += [f"## Benchmarks, raw and corrected (block {metrics.get('block')})", "", *_md_table(header, rows), ""]
    for name, why in (metrics.get("skipped") or {}).items():
        md.append(f"- skipped {name}: {why}")
    md.append("")
    for key, title in EVAL_PLOTS:
        if key in plots:
            md += [f"![{title}]({Path(plots[key]).relative_to(root)})", ""]
    md += ["## Runs", ""]
    md += [
        f"- {name}: `{Path(d).relative_to(root) if Path(d).is_relative_to(root) else d}`"
        for name, d in metrics["runs"].items()
    ]
    seconds = metrics.get("seconds", {})
    md += ["", "Seconds per step: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), ""]
    md.append("All numbers are in `metrics.json`.")
    return atomic_write_text(path, "\n".join(md) + "\n")
