"""The papers' findings on the embedded screen, over seeds: mean ± std of every comparison, and the bars.

Per seed it runs the main job (``cellrep-mission seed=<s> run_name=science_s<s>``: both training arms,
per-block probes, every correction and benchmark, the intensity baseline) and probes the same
architecture at random initialization (the untrained control), then prints one table:

    python benchmarks/science.py [--seeds 0 1 2] [-- <cellrep-mission overrides>]

Named missions reuse finished steps, so a re-run only aggregates. Results: docs/SCIENCE.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cellrep  # noqa: F401, E402  (torchvision compat before lightning/timm)

# isort: split
import numpy as np  # noqa: E402
from _common import machine, table  # noqa: E402

SOURCE, THRESHOLDS = "StringDB", ("0.05/0.95", "0.1/0.9")  # recall summed over both thresholds
CORRECTIONS = ("none", "pca_centerscale", "tvn")


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def untrained_probe(mission_dir: Path, seed: int) -> float:
    """Best-block held-out top-1 of the evaluated arm's architecture at random initialization."""
    out = mission_dir / "untrained"
    ckpt = out / "checkpoints" / "init.ckpt"
    if not ckpt.is_file():  # a 0-epoch fit of the arm's own config gives a loadable checkpoint of the init
        import lightning as L
        from omegaconf import OmegaConf

        from cellrep.data.loading.datamodule import CellDataModule
        from cellrep.data.shards.prepare import ensure_shards
        from cellrep.training.tasks import build_task

        cfg = OmegaConf.load(mission_dir / "train_batch" / "config.yaml")
        L.seed_everything(seed, workers=True)
        dm = CellDataModule.from_config(ensure_shards(cfg.data).shards_dir, cfg.data, cfg.split, cfg.seed)
        dm.prepare()
        task = build_task(cfg, dm)
        trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(task, datamodule=dm)
        trainer.save_checkpoint(ckpt)
        (out / "config.yaml").write_text((mission_dir / "train_batch" / "config.yaml").read_text())
    probe_dir = out / "probe"
    if not (probe_dir / "metrics.json").is_file():
        run(["cellrep-probe", f"ckpt_path={ckpt}", f"seed={seed}", f"paths.output_dir={probe_dir}"])
    return json.loads((probe_dir / "metrics.json").read_text())["probe"]["best_test_acc"]


def seed_row(metrics: dict, untrained: float) -> dict[str, float]:
    c, b = metrics["comparisons"], metrics["benchmarks"]
    row = {
        "batch top-1": c["accuracy"]["arms"]["batch"]["top1"],
        "random top-1": c["accuracy"]["arms"]["random"]["top1"],
        # the block chosen on validation rows, as the report uses it (a max over test rows would peek)
        "probe best block": next(
            blk["test_acc"] for blk in metrics["probe"]["blocks"] if blk["block"] == metrics["probe"]["best_block"]
        ),
        "untrained best block": untrained,
        "intensity baseline": metrics["baseline"]["intensity"]["test_acc"],
    }
    for corr in CORRECTIONS:
        row[f"recall {corr}"] = sum(c["recall"][SOURCE][t][corr] for t in THRESHOLDS)
        row[f"DTI AP {corr}"] = c["dti"][corr]["ap"]
        row[f"classification {corr}"] = b[corr]["classification"]["top1"]
        row[f"consistency p<0.05 {corr}"] = b[corr]["consistency"]["frac_p_lt_0.05"]
    row["DTI AP random"] = c["dti"]["none"]["random_ap"]
    return row


def bars(rows: list[dict[str, float]]) -> list[tuple[str, bool, str]]:
    """Each bar of docs/SCIENCE.md: (what, holds, the numbers it was judged on)."""
    col = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    m, s = ({k: v.mean() for k, v in col.items()}, {k: v.std(ddof=1) if len(v) > 1 else 0.0 for k, v in col.items()})
    gap = m["random top-1"] - m["batch top-1"]
    tvn_gain = col["recall tvn"] - col["recall none"]
    pca_gain = col["recall pca_centerscale"] - col["recall none"]
    learned = m["probe best block"] - m["untrained best block"]
    worst_cls = min(m[f"classification {c}"] - m["classification none"] for c in CORRECTIONS[1:])
    return [
        (
            "random top-1 − batch top-1 > 2 × larger std",
            gap > 2 * max(s["random top-1"], s["batch top-1"]),
            f"{gap:.3f} vs {2 * max(s['random top-1'], s['batch top-1']):.3f}",
        ),
        (
            "TVN recall gain ≥ 0.05, never < −0.05",
            tvn_gain.mean() >= 0.05 and tvn_gain.min() >= -0.05,
            f"mean {tvn_gain.mean():.3f}, min {tvn_gain.min():.3f}",
        ),
        ("PCA-centerscale recall gain > 0", pca_gain.mean() > 0, f"mean {pca_gain.mean():.3f}"),
        (
            "DTI median AP (tvn) ≥ random + 0.3",
            m["DTI AP tvn"] >= m["DTI AP random"] + 0.3,
            f"{m['DTI AP tvn']:.3f} vs {m['DTI AP random']:.3f}",
        ),
        ("no correction drops classification by > 0.05", worst_cls >= -0.05, f"worst {worst_cls:+.3f}"),
        (
            "TVN consistency: > half at p < 0.05",
            m["consistency p<0.05 tvn"] > 0.5,
            f"{m['consistency p<0.05 tvn']:.3f}",
        ),
        (
            "trained best block − untrained > 2 × std",
            learned > 2 * max(s["probe best block"], s["untrained best block"]),
            f"{learned:.3f} vs {2 * max(s['probe best block'], s['untrained best block']):.3f}",
        ),
        (
            "intensity baseline below trained and untrained",
            m["intensity baseline"] < min(m["probe best block"], m["untrained best block"]),
            f"{m['intensity baseline']:.3f}",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="cellrep-mission overrides (after --)")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        name = f"science_s{seed}"
        mission_dir = Path("outputs/mission/runs") / name
        if not (mission_dir / "metrics.json").is_file():
            run(["cellrep-mission", f"seed={seed}", f"run_name={name}", *args.overrides])
        metrics = json.loads((mission_dir / "metrics.json").read_text())
        rows.append(seed_row(metrics, untrained_probe(mission_dir, seed)))
    print(f"\n{machine()}; seeds {args.seeds}; mean ± std (ddof=1) over seeds\n")
    print(
        table(
            ["comparison", "mean ± std", *[f"seed {s}" for s in args.seeds]],
            [
                [
                    k,
                    f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows], ddof=1) if len(rows) > 1 else 0:.3f}",
                    *[f"{r[k]:.3f}" for r in rows],
                ]
                for k in rows[0]
            ],
        )
    )
    print()
    print(table(["bar", "holds", "on"], [[what, "yes" if ok else "NO", on] for what, ok, on in bars(rows)]))


if __name__ == "__main__":
    main()
