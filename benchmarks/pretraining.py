"""Pretraining methods side by side on one screen and one architecture, over seeds.

For each seed and method it trains the same small ViT (``cellrep-train``), then evaluates the
checkpoint (``cellrep-eval block=best``: per-block linear probes and 1-NN from one backbone
pass, the validation-chosen block embedded, TVN, StringDB recall) and prints one table of
mean ± std over seeds, with each method's paired gain over random initialization:

    python benchmarks/pretraining.py [--seeds 0 1 2] [--methods random supervised mae dino simclr] [--epochs 20]
        [--set mae:task.optimizer.base_lr=1e-3 ...] [--tag lr1e-3] [-- <overrides every training run gets>]

``random`` is the architecture at initialization (one ``task=mae`` step at learning rate 0, so
its encoder is the same ViT, untouched). The recipe (``RECIPE``, ``METHODS``) is the CPU-sized one docs/SCIENCE.md
gives (``--set`` changes one method's settings, ``--tag`` keeps another sweep point's runs apart); named runs
under ``outputs/*/runs/pretrain_*`` are reused, so a re-run only aggregates. Run one at a time: two of these
jobs on 2 cores, each on 2 OpenMP threads, train several times slower than one after the other.
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
import pandas as pd  # noqa: E402
from _common import machine, table  # noqa: E402

# A ViT small enough for 2 CPU cores: 192 wide, 6 blocks, patch 8 on the 32-px crops (16 tokens).
RECIPE = [
    "model=vit_s16",
    "+model.kwargs.patch_size=8",
    "+model.kwargs.embed_dim=192",
    "+model.kwargs.depth=6",
    "+model.kwargs.num_heads=3",
    "test=false",
]
METHODS: dict[str, list[str]] = {
    # one step at learning rate 0: a checkpoint of the initialization, through the same code path
    "random": ["task=mae", "trainer.max_epochs=1", "trainer.max_steps=1", "task.optimizer.base_lr=0"],
    "supervised": ["task=supervised"],
    # the learning rates of the measured sweep in docs/SCIENCE.md (each method's published default hardly moves
    # the weights in 20 CPU epochs); DINO with 2 small local crops and a faster teacher for the short schedule
    "mae": [
        "task=mae",
        "task.decoder_dim=128",
        "task.decoder_depth=2",
        "task.decoder_heads=4",
        "task.optimizer.base_lr=5e-4",
    ],
    "dino": ["task=dino", "task.local_crops=2", "task.momentum_teacher=0.95", "task.optimizer.base_lr=2e-3"],
    "simclr": ["task=simclr"],
}
SOURCE, THRESHOLDS = "StringDB", ("0.05/0.95", "0.1/0.9")  # recall summed over both thresholds
EVAL = ["block=best", "corrections=[none,tvn]", "benchmarks=[recall]", "plots.umap=false", "progress=false"]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train_dir(method: str, seed: int, tag: str) -> Path:
    task = next(o.split("=", 1)[1] for o in METHODS[method] if o.startswith("task="))
    return Path("outputs") / task / "runs" / f"pretrain{tag}_{method}_s{seed}"


def probe_curve(run_dir: Path) -> dict[int, float]:
    """The block-probe callback's best held-out top-1 at each probed epoch (its own probe subset, so lower
    than cellrep-eval's probe): how accuracy grows with training steps."""
    path = run_dir / "csv" / "metrics.csv"
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if "probe/best_acc" not in frame:
        return {}
    probes = frame.dropna(subset=["probe/best_acc"])[["step", "probe/best_acc"]].sort_values("step")
    epochs = frame.dropna(subset=["epoch"])[["step", "epoch"]].sort_values("step")
    # the probe rows carry a step only: the epoch is that of the last row logged before them
    probes = pd.merge_asof(probes, epochs, on="step", allow_exact_matches=False)
    return {int(e) + 1: float(a) for e, a in zip(probes["epoch"], probes["probe/best_acc"])}


def evaluate(
    method: str, seed: int, epochs: int, overrides: list[str], extra: dict[str, list[str]], tag: str
) -> dict[str, float]:
    run_dir = train_dir(method, seed, tag)
    if not (run_dir / "metrics.json").is_file():
        epochs_arg = [] if method == "random" else [f"trainer.max_epochs={epochs}"]
        # the method's own settings last: they win over the common overrides (random keeps learning rate 0)
        cmd = [*RECIPE, *overrides, *epochs_arg, *METHODS[method], *extra.get(method, [])]
        run(["cellrep-train", *cmd, f"seed={seed}", f"run_name={run_dir.name}"])
    eval_dir = run_dir / "eval"
    if not (eval_dir / "metrics.json").is_file():
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        run(["cellrep-eval", f"ckpt_path={ckpt}", f"seed={seed}", f"paths.output_dir={eval_dir}", *EVAL])
    m = json.loads((eval_dir / "metrics.json").read_text())
    probes = pd.read_csv(eval_dir / "probe.csv").set_index("block")  # per block: test_acc, knn_top1, ...
    best = m["probe"]["best_block"]  # chosen on validation rows
    recall = m["benchmarks"]["tvn"]["recall"][SOURCE]
    return {
        "best-block probe": float(probes.loc[best, "test_acc"]),
        "last-block probe": float(probes["test_acc"].iloc[-1]),
        "best-block kNN": float(probes.loc[best, "knn_top1"]),
        "recall TVN": sum(recall[t] for t in THRESHOLDS),
        "best block index": float(list(probes.index).index(best)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--set", action="append", default=[], metavar="METHOD:OVERRIDE", help="e.g. mae:task.optimizer.base_lr=1e-3"
    )
    parser.add_argument("--tag", default="", help="run-name suffix: another sweep point keeps its own runs")
    parser.add_argument("overrides", nargs="*", help="cellrep-train overrides of every run (after --)")
    args = parser.parse_args()
    extra: dict[str, list[str]] = {}
    for item in args.set:
        method, _, override = item.partition(":")
        extra.setdefault(method, []).append(override)
    tag = f"_{args.tag}" if args.tag else ""
    rows = {m: [evaluate(m, s, args.epochs, args.overrides, extra, tag) for s in args.seeds] for m in args.methods}
    # the in-training probe curve, a table of its own; random initialization has none
    curves = {m: [{f"epoch {e}": a for e, a in probe_curve(train_dir(m, s, tag)).items()} for s in args.seeds]
              for m in args.methods}  # fmt: skip
    keys = list(next(iter(rows.values()))[0])

    def cell(values: list[float]) -> str:
        sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
        return f"{np.mean(values):.3f} ± {sd:.3f}"

    print(f"\n{machine()}; seeds {args.seeds}; {args.epochs} epochs; mean ± std (ddof=1) over seeds\n")
    print(table(["method", *keys], [[meth, *[cell([r[k] for r in rs]) for k in keys]] for meth, rs in rows.items()]))
    epochs = sorted({k for cs in curves.values() for c in cs for k in c}, key=lambda k: int(k.split()[1]))
    if epochs:
        print("\nbest-block held-out top-1 of the in-training block probes (callbacks.block_probes) after each epoch\n")
        lines = [[m, *[cell([c[k] for c in cs if k in c]) if any(k in c for c in cs) else "" for k in epochs]]
                 for m, cs in curves.items() if any(cs)]  # fmt: skip
        print(table(["method", *epochs], lines))
    if "random" in rows:
        print("\npaired gain over random initialization (same seed), mean ± std; holds: mean > 2 × std\n")
        out = []
        for meth, rs in rows.items():
            if meth == "random":
                continue
            gains = {k: [r[k] - b[k] for r, b in zip(rs, rows["random"])] for k in keys[:4]}
            out.append(
                [
                    meth,
                    *[
                        f"{cell(g)} {'yes' if np.mean(g) > 2 * np.std(g, ddof=1 if len(g) > 1 else 0) else 'NO'}"
                        for g in gains.values()
                    ],
                ]
            )
        print(table(["method", *keys[:4]], out))


if __name__ == "__main__":
    main()
