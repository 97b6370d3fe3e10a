"""cellrep-probe: linear probes on every block of a trained backbone, from one backbone pass.

    cellrep-probe ckpt_path=outputs/supervised/<date>/<run>/checkpoints/best.ckpt

Reads the run's data and split (``<run>/config.yaml``), records the pooled
feature of every block (every stage of a CNN) in ONE pass over all sites,
trains a BatchNorm + linear probe per block and learning rate on the training
experiments, picks each block's learning rate on validation and scores the
held-out experiments (docs/benchmarks.md); next to each probe, 1-nearest-neighbour (cosine)
classification of the held-out rows against the training rows (``knn_top1``, ``knn_macro_f1``;
``probe.knn=false`` to skip). Writes ``probe.csv``, ``probe.json``,
``probe.png`` and ``metrics.json``; prints the table and the best block and
logs them to the configured loggers.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import logging
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from cellrep.cli.common import exit_on_user_error, register_resolvers
from cellrep.cli.resume import pin_ddp_children
from cellrep.cli.rundir import RunDir
from cellrep.config import register_configs
from cellrep.errors import CellrepError
from cellrep.eval.channels import channel_summary, leave_one_channel_out, save_channel_outputs
from cellrep.eval.pipeline import across_ranks, model_file, prepare, probe_all_blocks, probe_settings
from cellrep.eval.report import channel_lines, probe_lines
from cellrep.eval.runtime import log_to_loggers, probe_summary, save_probe_outputs, validate_config

log = logging.getLogger("cellrep.cli.probe")
register_configs()
register_resolvers()


def probe(cfg: DictConfig) -> dict[str, Any]:
    validate_config(cfg)
    if not cfg.ckpt_path and not cfg.get("encoder"):
        raise CellrepError(
            "ckpt_path is not set",
            fix="pass ckpt_path=<run>/checkpoints/best.ckpt, or encoder=<published encoder> (docs/encoders.md)",
        )
    torch.manual_seed(cfg.seed)
    run = RunDir(cfg.paths.output_dir)
    run.write_provenance(cfg)

    pin_ddp_children(run.path)  # trainer=ddp: ranks 1.. re-run this command in this directory
    prep = across_ranks(prepare(cfg), cfg, run.path)
    cfg.model = {"name": prep.model["name"]}  # logger names refer to ${model.name}
    start = time.perf_counter()
    feats, sites, result = probe_all_blocks(prep, probe_settings(cfg), progress=cfg.progress)
    seconds = time.perf_counter() - start
    outputs = save_probe_outputs(run.path, result)
    channels = None
    if cfg.probe.get("leave_one_channel_out"):
        best = result.table.loc[result.table["block"] == result.best_block, "test_acc"].iloc[0]
        channels = leave_one_channel_out(
            prep.backbone,
            prep.datamodule,
            prep.device,
            result.best_block,
            best,
            probe_settings(cfg),
            cfg.progress,
            prep.context,
        )
        outputs.update(save_channel_outputs(run.path, channels))

    summary = probe_summary(result)
    if "knn_top1" in result.table:
        for col in ("knn_top1", "knn_macro_f1"):
            summary[col] = {r["block"]: float(r[col]) for r in result.table.to_dict(orient="records")}
    metrics: dict[str, Any] = {
        "probe": summary,
        "model": prep.model["name"],
        "ckpt_path": model_file(cfg),
        "num_blocks": len(result.table),
        "num_sites": int(len(sites)),
        "num_classes": prep.datamodule.num_classes,
        "split_counts": prep.datamodule.split_counts,
        "data_config_from": prep.data_source,
        "seconds": round(seconds, 2),
        "run_dir": str(run.path),
        "files": {k: str(v) for k, v in outputs.items()},
        "channels": prep.datamodule.channel_plan.kept_names,
        "context": prep.context_record,  # whether the checkpoint's cell-type context conditioned the features
    }
    if channels is not None:
        metrics["leave_one_channel_out"] = channel_summary(channels)
    flat = {f"probe/test_acc/{b}": v for b, v in summary["test_acc"].items()}
    flat.update({f"probe/val_acc/{b}": v for b, v in summary["val_acc"].items()})
    for col in ("knn_top1", "knn_macro_f1"):
        flat.update({f"probe/{col}/{b}": v for b, v in summary.get(col, {}).items()})
    flat.update(
        {"probe/best_block_index": summary["best_block_index"], "probe/best_test_acc": summary["best_test_acc"]}
    )
    log_to_loggers(
        cfg, flat, {"best_block": result.best_block, "ckpt_path": model_file(cfg), "model": prep.model["name"]}
    )
    run.write_metrics(metrics)

    print("\n".join(probe_lines(result.table, result.best_block, result.selected_on)))
    print("\n".join(knn_lines(result.table)))
    if channels is not None:
        print("\n".join(channel_lines(channels)))
    print(
        f"best block: {result.best_block} (index {summary['best_block_index']}), held-out top-1 "
        f"{summary['best_test_acc']:.3f} (chance {summary['chance']:.3f}); {len(result.table)} blocks from one "
        f"backbone pass over {len(sites)} sites in {seconds:.1f}s"
    )
    print(f"  outputs: {run.path}")
    return metrics


def knn_lines(table) -> list[str]:
    """The kNN column next to the probes: 1-NN (cosine) of held-out rows against training rows, per block."""
    if "knn_top1" not in table:
        return []
    lines = ["1-nearest-neighbour (cosine, CHAMMI) per block, held-out vs training rows:"]
    lines.append(f"  {'block':<12} {'kNN top-1':>9} {'macro-F1':>8} {'probe top-1':>11}")
    for r in table.itertuples():
        lines.append(f"  {r.block:<12} {r.knn_top1:>9.3f} {r.knn_macro_f1:>8.3f} {r.test_acc:>11.3f}")
    return lines


@hydra.main(version_base="1.3", config_path="../conf", config_name="probe")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(probe, cfg)


if __name__ == "__main__":
    main()
