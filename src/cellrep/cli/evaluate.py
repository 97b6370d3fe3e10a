"""cellrep-eval: embeddings, batch correction and the biology benchmarks (docs/benchmarks.md).

    cellrep-eval ckpt_path=.../best.ckpt block=best benchmarks=[recall,consistency,dti]
    cellrep-eval embeddings=published.parquet [metadata=meta.csv join_on=well_id]

With a checkpoint: every site is embedded with the chosen block (``best`` probes
all blocks from the same single pass), sites are averaged per well and written
to ``embeddings.parquet``. With ``embeddings=``: any parquet of well
embeddings (metadata + ``feature_*``) is used as is, no model needed. Then
each batch correction in ``corrections`` is applied and every benchmark in
``benchmarks`` runs on each; ``metrics.json``, ``report.md`` and the plots
land in the run directory.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cellrep.cli.common import exit_on_user_error, register_resolvers
from cellrep.cli.resume import pin_ddp_children
from cellrep.cli.rundir import RunDir
from cellrep.config import register_configs
from cellrep.eval import plots
from cellrep.eval.checkpoint import context_line
from cellrep.eval.embeddings import read_embeddings
from cellrep.eval.pipeline import across_ranks, embed_checkpoint, model_file, prepare, probe_settings
from cellrep.eval.report import benchmark_lines, probe_lines, write_markdown
from cellrep.eval.runtime import log_to_loggers, probe_summary, save_probe_outputs, validate_config
from cellrep.eval.suite import flatten, resolve_targets, run_suite

log = logging.getLogger("cellrep.cli.evaluate")
register_configs()
register_resolvers()


def load_or_embed(cfg: DictConfig, run: RunDir) -> tuple[Any, dict[str, Any], list, Any]:
    """(well embeddings, info for the report, folders to search for a DTI table, probe result or None)."""
    if cfg.embeddings:
        emb = read_embeddings(cfg.embeddings, cfg.metadata, cfg.join_on, dict(cfg.rename or {}))
        return emb, {"embeddings": str(cfg.embeddings)}, [Path(cfg.embeddings).expanduser().parent], None
    pin_ddp_children(run.path)  # trainer=ddp: ranks 1.. re-run this command in this directory
    prep = across_ranks(prepare(cfg), cfg, run.path)
    cfg.model = {"name": prep.model["name"]}  # logger names refer to ${model.name}
    emb, block, result = embed_checkpoint(cfg, prep, progress=cfg.progress)
    info = {
        "checkpoint": model_file(cfg),
        "model": prep.model["name"],
        "block": block,
        "data/split from": prep.data_source,
        "cell-type context": context_line(prep.context_record),  # metrics.json and report.md
    }
    return emb, info, [prep.dataset_root], result


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    validate_config(cfg)
    torch.manual_seed(cfg.seed)
    run = RunDir(cfg.paths.output_dir)
    run.write_provenance(cfg)
    start = time.perf_counter()

    emb, info, search, probe_result = load_or_embed(cfg, run)
    info.update({"wells": len(emb), "features": emb.dim, "experiments": int(emb.meta["experiment"].nunique())})
    emb.write_parquet(run.path / "embeddings.parquet")
    plot_files: dict[str, Path] = {}
    if probe_result is not None:
        plot_files["probe"] = save_probe_outputs(run.path, probe_result)["plot"]

    benchmarks = OmegaConf.to_container(cfg.benchmarks, resolve=True) if cfg.benchmarks else {}
    targets, why = (None, None)
    for name in ("dti", "map_consistency"):  # both read the drug-target table (the same targets= setting)
        if name in benchmarks and targets is None and why is None:
            targets, why = resolve_targets(str(benchmarks[name].get("targets", "auto")), search)
    suite = run_suite(
        emb,
        list(cfg.corrections),
        benchmarks,
        probe_settings(cfg),
        targets,
        why,
        cfg.progress,
        correction_settings=OmegaConf.to_container(cfg.correction, resolve=True) if cfg.get("correction") else None,
    )
    if cfg.write_corrected:
        for method, corrected in suite.corrected.items():
            if method != "none":
                corrected.write_parquet(run.path / f"embeddings_{method}.parquet")
    emb.write_h5ad(run.path / "embeddings.h5ad", {m: c for m, c in suite.corrected.items() if m != "none"})
    plot_files.update({k: p for k, p in suite.write_tables(run.path).items() if p.suffix == ".png"})

    if any("recall" in m for m in suite.metrics.values()):
        plot_files["recall"] = plots.recall_bars(suite.metrics, run.path / "recall.png")
    if "recall_curve" in suite.tables:
        plot_files["recall_curve"] = plots.recall_curve(suite.tables["recall_curve"], run.path / "recall_curve.png")
    maps = {k.removeprefix("map_activity_"): t for k, t in suite.tables.items() if k.startswith("map_activity_")}
    if maps:
        threshold = float(benchmarks["map_activity"]["threshold"])
        plot_files["map_activity"] = plots.map_significance(maps, run.path / "map_activity.png", threshold)
    if cfg.plots.umap and suite.corrected:
        p = cfg.plots
        plot_files["umap"] = plots.umap_grid(
            suite.corrected,
            run.path / "umap.png",
            int(p.umap_max_wells),
            int(cfg.seed),
            int(p.umap_neighbors),
            float(p.umap_min_dist),
            str(p.umap_metric),
            str(p.color_by),
            int(p.max_colors),
        )
    if suite.dti_per_compound:
        primary = "tvn" if "tvn" in suite.dti_per_compound else next(reversed(suite.dti_per_compound))
        table = suite.dti_per_compound[primary]
        table.to_csv(run.path / f"dti_per_compound_{primary}.csv", index=False)
        plot_files["dti"] = plots.dti_distribution(table, run.path / "dti.png", correction=primary)

    metrics: dict[str, Any] = {
        **info,
        "corrections": list(cfg.corrections),
        "benchmarks": suite.metrics,
        "skipped": suite.skipped,
        "dti_targets": str(targets) if targets else None,
        "seconds": round(time.perf_counter() - start, 2),
        "run_dir": str(run.path),
    }
    if probe_result is not None:
        metrics["probe"] = probe_summary(probe_result)
    write_markdown(
        run.path / "report.md",
        info,
        plot_files,
        probe_result.table if probe_result is not None else None,
        probe_result.best_block if probe_result is not None else None,
        suite.metrics,
        suite.skipped,
    )
    log_to_loggers(cfg, flatten({"eval": suite.metrics}), {k: str(v) for k, v in info.items()})
    run.write_metrics(metrics)

    if probe_result is not None:
        print("\n".join(probe_lines(probe_result.table, probe_result.best_block, probe_result.selected_on)))
    print(f"cellrep-eval: {len(emb)} wells × {emb.dim} features ({', '.join(f'{k}={v}' for k, v in info.items())})")
    print("\n".join(benchmark_lines(suite.metrics, suite.skipped)))
    print(f"  report: {run.path / 'report.md'}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(evaluate, cfg)


if __name__ == "__main__":
    main()
