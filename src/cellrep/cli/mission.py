"""cellrep-mission: the main job, the whole study in one command (``make demo``).

    cellrep-mission                                  # the embedded synthetic screen
    cellrep-mission 'train=["model=vit_s16"]'        # another model (any cellrep-train override)

Steps, each the existing entry point's own function run in this process (no
extra interpreter start-up), each in a sub-directory of the mission's run dir:

1. every arm of ``arms`` (default: ``split=batch`` and ``split=random``) is a
   :func:`cellrep.cli.train.train` run with ``train`` + the arm's overrides
   (``train_<arm>/``); the first one generates and shards the data (cached);
2. the ``evaluate_arm``'s checkpoint goes through :func:`cellrep.cli.evaluate.evaluate`
   with ``eval`` (``eval/``): ``block=best`` probes every block from one backbone
   pass, embeds with the best one, applies every correction, runs every benchmark;
3. the intensity-statistics baseline (:mod:`cellrep.eval.baselines`) is probed on
   the same split;
4. ``report.md`` (comparisons first: batch vs random accuracy, recall raw vs
   corrected, DTI AP vs random; then the probe table with the baseline row and
   every benchmark per correction), ``comparisons.png`` and ``metrics.json``.

Named missions (``run_name=``) reuse steps whose sub-directory already holds a
``metrics.json``, and an interrupted arm resumes from its ``last.ckpt``
(:func:`cellrep.cli.resume.resume_checkpoint`), so re-running the command after a
crash continues where it stopped. DDP is not supported inside a mission (Lightning
would re-launch the whole mission per rank): run the arms with ``cellrep-train``.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import pandas as pd
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig

from cellrep.cli.common import exit_on_user_error, register_resolvers
from cellrep.cli.evaluate import evaluate
from cellrep.cli.resume import job_environment
from cellrep.cli.rundir import RunDir
from cellrep.cli.train import train
from cellrep.config import register_configs
from cellrep.errors import CellrepError
from cellrep.eval import plots
from cellrep.eval.baselines import intensity_baseline
from cellrep.eval.checkpoint import build_eval_datamodule, eval_data_config
from cellrep.eval.pipeline import probe_settings
from cellrep.eval.report import EVAL_PLOTS, mission_comparisons, mission_head_lines, write_mission_markdown

log = logging.getLogger("cellrep.cli.mission")
register_configs()
register_resolvers()


def quote(value: Any) -> str:
    """A value as a Hydra override string: quoted, so paths with spaces, '=' or ',' stay one value
    (inside Hydra's quotes only a quote needs its backslash)."""
    return "'" + str(value).replace("'", "\\'") + "'"


def compose_step(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose another entry point's primary config the way its ``hydra.main`` would.

    Inside ``cellrep-mission`` Hydra is already initialized with cellrep's config module, so
    ``compose`` reuses it; called from Python (tests, notebooks) it is initialized here.
    """
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_module(config_module="cellrep.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def step_overrides(cfg: DictConfig, out_dir: Path) -> list[str]:
    """Paths and seed of the mission for one step: its output dir is a sub-directory of the mission's
    (``paths.output_dir`` is ``${hydra:runtime.output_dir}``, the mission's own dir, otherwise)."""
    p = cfg.paths
    return [
        f"paths.root_dir={quote(p.root_dir)}",
        f"paths.data_dir={quote(p.data_dir)}",
        f"paths.log_dir={quote(p.log_dir)}",
        f"paths.output_dir={quote(out_dir)}",
        f"seed={int(cfg.seed)}",
    ]


def _override_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, ListConfig)) or not all(isinstance(v, str) for v in value):
        raise CellrepError(
            f"{name}={value!r} is not a list of override strings",
            fix=f"""write it as {name}='["key=value",...]' (quoted: the overrides hold '=')""",
        )
    return list(value)


def check_config(cfg: DictConfig) -> dict[str, list[str]]:
    """The arms (name -> overrides); every mistake in the mission's own settings, before any work."""
    arms = cfg.get("arms")
    if not isinstance(arms, DictConfig) or not arms:
        raise CellrepError("arms is empty", fix="e.g. arms={batch:[split=batch],random:[split=random]}")
    out = {str(name): _override_list(ov, f"arms.{name}") for name, ov in arms.items()}
    if cfg.evaluate_arm not in out:
        raise CellrepError(
            f"evaluate_arm={cfg.evaluate_arm} is not one of the arms {list(out)}",
            fix=f"set evaluate_arm to one of {list(out)}",
        )
    _override_list(cfg.train, "train")
    _override_list(cfg.eval, "eval")
    return out


class Steps:
    """Numbered, announced steps; a named mission reuses a step whose directory holds metrics.json."""

    def __init__(self, total: int, reuse: bool):
        self.total, self.reuse, self.done, self.seconds = total, reuse, 0, {}

    def run(self, key: str, what: str, out_dir: Path | None, fn: Callable[[], Any]) -> Any:
        self.done += 1
        finished = out_dir is not None and (out_dir / "metrics.json").is_file()
        where = f" -> {out_dir}" if out_dir is not None else ""
        if finished and self.reuse:
            print(f"\n[mission {self.done}/{self.total}] {what}: finished earlier, reused{where}", flush=True)
            self.seconds[key] = 0.0
            return json.loads((out_dir / "metrics.json").read_text())
        print(f"\n[mission {self.done}/{self.total}] {what}{where}", flush=True)
        start = time.perf_counter()
        with job_environment():  # each step starts with the process environment the mission started with
            result = fn()
        self.seconds[key] = round(time.perf_counter() - start, 2)
        if out_dir is not None:
            result = json.loads((out_dir / "metrics.json").read_text())
        return result


def arm_checkpoint(name: str, metrics: dict[str, Any]) -> Path:
    """The arm's best checkpoint (last.ckpt when no best was kept)."""
    run_dir = Path(metrics["run_dir"])
    for candidate in (metrics.get("best_checkpoint"), run_dir / "checkpoints" / "last.ckpt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise CellrepError(
        f"training arm {name} wrote no checkpoint in {run_dir / 'checkpoints'}",
        fix="keep callbacks=default in the arm's overrides (the evaluation needs best.ckpt or last.ckpt)",
    )


def run_baseline(eval_cfg: DictConfig) -> dict[str, Any]:
    """The intensity-statistics probe on the evaluated arm's data and split (docs/benchmarks.md)."""
    data, split, seed, _ = eval_data_config(eval_cfg)
    dm, _ = build_eval_datamodule(data, split, seed, eval_cfg.loader.batch_size, eval_cfg.loader.num_workers)
    result, seconds = intensity_baseline(dm, probe_settings(eval_cfg), progress=bool(eval_cfg.progress))
    row = result.table.iloc[0]
    return {
        "block": "intensity",
        "features": "per-channel mean and std per site, in units of the plate's negative controls",
        "dim": int(row["dim"]),
        "best_lr": float(row["best_lr"]),
        "val_acc": float(row["val_acc"]),
        "test_acc": float(row["test_acc"]),
        "test_acc_top5": float(row["test_acc_top5"]),
        "chance": float(row["chance"]),
        "seconds": round(seconds, 2),
    }


def mission(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    arms = check_config(cfg)
    run = RunDir(cfg.paths.output_dir)  # refuses a finished mission
    run.write_provenance(cfg)
    order = [cfg.evaluate_arm, *(a for a in arms if a != cfg.evaluate_arm)]  # the evaluated model first
    steps = Steps(len(arms) + 1 + bool(cfg.baseline), reuse=bool(cfg.get("run_name")))

    arm_metrics: dict[str, dict[str, Any]] = {}
    for name in order:
        out = run.path / f"train_{name}"
        overrides = [*cfg.train, *arms[name], *step_overrides(cfg, out)]
        what = f"train arm '{name}' ({' '.join(arms[name]) or 'no overrides'})"
        arm_metrics[name] = steps.run(f"train_{name}", what, out, lambda ov=overrides: train(compose_step("train", ov)))

    ckpt = arm_checkpoint(cfg.evaluate_arm, arm_metrics[cfg.evaluate_arm])
    eval_dir = run.path / "eval"
    eval_cfg = compose_step(
        "eval",
        [f"ckpt_path={quote(ckpt)}", f"progress={bool(cfg.progress)}", *cfg.eval, *step_overrides(cfg, eval_dir)],
    )
    eval_metrics = steps.run(
        "eval",
        f"probe every block of '{cfg.evaluate_arm}', embed, correct, benchmark",
        eval_dir,
        lambda: evaluate(eval_cfg),
    )
    baseline = None
    if cfg.baseline:
        baseline = steps.run("baseline", "intensity-statistics baseline probe", None, lambda: run_baseline(eval_cfg))

    probe_csv = eval_dir / "probe.csv"
    probe_table = pd.read_csv(probe_csv) if probe_csv.is_file() else None
    comparisons = mission_comparisons(arm_metrics, cfg.evaluate_arm, eval_metrics)
    plot_files = {"comparisons": plots.mission_comparisons(comparisons, run.path / "comparisons.png")}
    for name, _ in EVAL_PLOTS:
        if (eval_dir / f"{name}.png").is_file():
            plot_files[name] = eval_dir / f"{name}.png"

    evaluated = arm_metrics[cfg.evaluate_arm]
    metrics: dict[str, Any] = {
        "comparisons": comparisons,
        "probe": {
            "best_block": (eval_metrics.get("probe") or {}).get("best_block"),
            "blocks": probe_table.to_dict(orient="records") if probe_table is not None else [],
        },
        "baseline": {"intensity": baseline} if baseline else {},
        "benchmarks": eval_metrics.get("benchmarks", {}),
        "skipped": eval_metrics.get("skipped", {}),
        "arms": {
            name: {k: v for k, v in m.items() if k.startswith(("test/", "val/")) or k in ("split", "split_counts")}
            for name, m in arm_metrics.items()
        },
        "model": evaluated.get("model"),
        "dataset": evaluated.get("dataset"),
        "seed": int(cfg.seed),
        "evaluate_arm": cfg.evaluate_arm,
        "block": eval_metrics.get("block"),
        # what a multirun summary (cli/report.sweep_table) reads per job: the evaluated arm's accuracy
        "num_classes": evaluated.get("num_classes"),
        "test/acc": evaluated.get("test/acc"),
        "test/acc_top5": evaluated.get("test/acc_top5"),
        "runs": {**{name: m["run_dir"] for name, m in arm_metrics.items()}, "eval": str(eval_dir)},
        "seconds": {**steps.seconds, "total": round(time.perf_counter() - start, 2)},
        "run_dir": str(run.path),
    }
    head = mission_head_lines(comparisons)
    write_mission_markdown(
        run.path / "report.md",
        head,
        metrics,
        probe_table,
        baseline,
        plot_files,
    )
    run.write_metrics(metrics)
    print("\n" + "\n".join(head))
    best = next((b for b in metrics["probe"]["blocks"] if b["block"] == metrics["probe"]["best_block"]), None)
    if best is not None:
        vs = f" vs intensity baseline {baseline['test_acc']:.3f}" if baseline else ""
        print(
            f"- probe: best block {best['block']} held-out top-1 {best['test_acc']:.3f}{vs}; chance {best['chance']:.3f}"
        )
    print(f"  report: {run.path / 'report.md'}  ({metrics['seconds']['total']:.0f}s)")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="mission")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(mission, cfg)


if __name__ == "__main__":
    main()
