"""Does the synthetic screen reward a learned representation? (docs/data.md, "The synthetic screen")

On one screen config, for the held-out-experiment split (batch) and the random split:

  intensity   linear probe on 2·C numbers per site: each channel's mean and std, per plate in
              units of the plate's negative controls (cellrep.eval.baselines)
  untrained   the same architecture with random weights, best probed block
  trained     cellrep-train held-out top-1 (its metrics.json)
  probed      the trained backbone's best probed block (the cellrep-probe procedure, run here so that
              accuracy over treated sites can be read too)

    python benchmarks/screen_check.py                         # the default screen
    python benchmarks/screen_check.py --epochs 4 -- debug=tiny data.synthetic.seed=1

Overrides after ``--`` go to every composed config and to both CLIs. Everything is written
under --work (screen cache, shards, runs); a rerun reuses the screen and shards.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (before torch/timm)

# isort: split
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from cellrep.cli.common import register_resolvers
from cellrep.config import register_configs
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.shards.prepare import ensure_shards
from cellrep.eval.baselines import intensity_statistics, normalize_to_controls
from cellrep.eval.features import extract_block_features
from cellrep.eval.probe import ProbeSettings, train_probes
from cellrep.models.backbone import build_backbone
from cellrep.models.checkpoint import load_backbone

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--work", default="outputs/screen_check", help="folder for the screen cache, shards and runs")
p.add_argument("--model", default="resnet10t", help="timm name of the small CNN")
p.add_argument("--epochs", type=int, default=6)
p.add_argument("--probe-epochs", type=int, default=30, help="linear-probe epochs (cellrep-probe: 30)")
p.add_argument("--splits", nargs="+", default=["batch", "random"])
p.add_argument("--no-train", action="store_true", help="only the intensity and untrained rows")
p.add_argument("overrides", nargs="*", help="Hydra overrides for the screen/data (after --)")
args = p.parse_args()
work = Path(args.work).resolve()
common = [f"paths.root_dir={work}", f"paths.data_dir={work}/data", *args.overrides]
register_configs()
register_resolvers()
torch.manual_seed(0)


def compose_train(split: str):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="cellrep.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[*common, f"split={split}", f"model.name={args.model}"])


def run(cli: str, overrides: list[str], out: Path) -> dict:
    """One CLI run into ``out`` (reused when it already finished): its metrics.json."""
    if not (out / "metrics.json").exists():
        cmd = [cli, *common, f"paths.output_dir={out}", "hydra.run.dir=" + str(out), *overrides]
        log = out.parent / f"{out.name}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "offline"})
        if done.returncode:
            sys.exit(f"{cli} failed (exit {done.returncode}); see {log}")
    return json.loads((out / "metrics.json").read_text())


def accuracies(result, block: str, sites) -> tuple[float, float]:
    """(held-out top-1 over all test sites, over its treated sites only: negative controls excluded)."""
    test = (sites["split"] == "test").to_numpy()
    hit = result.test_logits[block].argmax(1) == sites["label"].to_numpy()[test]
    treated = (sites["well_type"] != "negative_control").to_numpy()[test]
    return float(hit.mean()), float(hit[treated].mean())


def probe_backbone(backbone, dm, settings) -> tuple[float, float]:
    """Best block (chosen on validation) of per-block linear probes, as cellrep-probe does."""
    feats = extract_block_features(backbone, dm.eval_dataloader("all"), None, "cpu", progress=False)
    sites = dm.index.iloc[feats.rows].reset_index(drop=True)
    labels, stage = sites["label"].to_numpy(), sites["split"].to_numpy()
    result = train_probes(feats.features, labels, stage, dm.num_classes, settings, keep_logits=True, progress=False)
    return accuracies(result, result.best_block, sites)


rows, t0 = {}, time.perf_counter()
for split in args.splits:
    cfg = compose_train(split)
    shards = ensure_shards(cfg.data, progress=False)
    dm = CellDataModule.from_config(shards.shards_dir, cfg.data, cfg.split, cfg.seed, num_workers=0)
    dm.prepare()
    settings = ProbeSettings(epochs=args.probe_epochs, seed=cfg.seed)
    row = {"sites": len(dm.index), "classes": dm.num_classes, "chance": 1.0 / dm.num_classes}
    row["test_sites"] = int((dm.index["split"] == "test").sum())
    row["control_frac"] = float((dm.index["well_type"] == "negative_control").mean())
    rows_i, feats_i = intensity_statistics(dm.eval_dataloader("all"), progress=False)
    sites = dm.index.iloc[rows_i].reset_index(drop=True)
    x = {"intensity": normalize_to_controls(feats_i, sites).astype(np.float32)}
    result = train_probes(
        x,
        sites["label"].to_numpy(),
        sites["split"].to_numpy(),
        dm.num_classes,
        settings,
        keep_logits=True,
        progress=False,
    )
    row["intensity"], row["intensity_trt"] = accuracies(result, "intensity", sites)
    row["untrained"], row["untrained_trt"] = probe_backbone(
        build_backbone(args.model, in_chans=dm.in_chans), dm, settings
    )
    if not args.no_train:
        train_dir = work / "runs" / f"{args.model}-{split}"
        trained = run(
            "cellrep-train",
            [
                f"split={split}",
                f"model.name={args.model}",
                f"trainer.max_epochs={args.epochs}",
                "trainer=cpu",
                "logger=csv",
                "data.num_workers=0",
                "trainer.enable_progress_bar=false",
            ],
            train_dir,
        )
        row["trained"] = float(trained.get("test/acc", float("nan")))
        backbone, _ = load_backbone(train_dir / "checkpoints" / "best.ckpt")
        row["probed"], row["probed_trt"] = probe_backbone(backbone, dm, settings)
    rows[split] = row

print(
    f"\nscreen: {' '.join(args.overrides) or 'default'}  model: {args.model}  epochs: {args.epochs}  "
    f"({time.perf_counter() - t0:.0f}s)"
)
print("held-out top-1; *_trt: over treated test sites only (negative controls excluded)")
cols = [
    "sites",
    "classes",
    "control_frac",
    "chance",
    "intensity",
    "intensity_trt",
    "untrained",
    "untrained_trt",
    "trained",
    "probed",
    "probed_trt",
]
print(f"{'split':8s}" + "".join(f"{c:>14s}" for c in cols))
for split, row in rows.items():
    cells = [f"{row[c]:14d}" if isinstance(row.get(c), int) else f"{row.get(c, float('nan')):14.3f}" for c in cols]
    print(f"{split:8s}" + "".join(cells))
if {"batch", "random"} <= set(rows) and "trained" in rows["batch"]:
    b, r = rows["batch"], rows["random"]
    print(
        f"random - batch (trained top-1): {r['trained'] - b['trained']:+.3f}; on batch: trained - intensity "
        f"{b['trained'] - b['intensity']:+.3f}, probed_trt - intensity_trt {b['probed_trt'] - b['intensity_trt']:+.3f}, "
        f"probed_trt - untrained_trt {b['probed_trt'] - b['untrained_trt']:+.3f}"
    )
