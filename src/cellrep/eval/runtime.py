"""What both evaluation entry points do around the science: validate the config, save the
probe's outputs, and send results to the configured loggers (csv, tensorboard, wandb)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from cellrep.errors import CellrepError
from cellrep.eval.plots import probe_curve
from cellrep.eval.probe import ProbeResult
from cellrep.io import atomic_write_json, atomic_write_text


def validate_config(cfg: DictConfig) -> None:
    """Instantiate the structured schema so every ``__post_init__`` check runs before any work."""
    try:
        OmegaConf.to_object(cfg)
    except CellrepError:
        raise
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "a value"
        raise CellrepError(f"{key} is not set", fix=f"pass {key}=... on the command line") from None
    except Exception as exc:  # noqa: BLE001 — a config problem, shown as one message
        raise CellrepError(f"invalid configuration: {exc}", fix="check the overrides on the command line") from None


def save_probe_outputs(out_dir: Path, result: ProbeResult) -> dict[str, Path]:
    """``probe.csv`` (one row per block), ``probe.json`` (everything, incl. per-lr accuracy), ``probe.png``."""
    out_dir = Path(out_dir)
    table = result.table
    csv = atomic_write_text(out_dir / "probe.csv", table.drop(columns=["acc_by_lr"]).to_csv(index=False))
    best = table.loc[table["block"] == result.best_block].iloc[0]
    record = {
        "best_block": result.best_block,
        "best_block_index": int(best["block_index"]),
        "best_test_acc": float(best["test_acc"]),
        "selected_on": result.selected_on,
        "blocks": table.to_dict(orient="records"),
    }
    js = atomic_write_json(out_dir / "probe.json", record)
    png = probe_curve(table, out_dir / "probe.png", result.best_block)
    return {"csv": csv, "json": js, "plot": png}


def probe_summary(result: ProbeResult) -> dict[str, Any]:
    table = result.table
    best = table.loc[table["block"] == result.best_block].iloc[0]
    return {
        "best_block": result.best_block,
        "best_block_index": int(best["block_index"]),
        "best_val_acc": float(best["val_acc"]),
        "best_test_acc": float(best["test_acc"]),
        "best_test_acc_top5": float(best["test_acc_top5"]),
        "chance": float(best["chance"]),
        "selected_on": result.selected_on,
        "test_acc": {r.block: float(r.test_acc) for r in table.itertuples()},
        "val_acc": {r.block: float(r.val_acc) for r in table.itertuples()},
    }


def log_to_loggers(cfg: DictConfig, metrics: dict[str, float], params: dict[str, Any]) -> list[str]:
    """Send flat numeric ``metrics`` and ``params`` to every logger of ``cfg.logger``; returns their names."""
    names = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        logger = instantiate(node)
        logger.log_hyperparams(params)
        logger.log_metrics(metrics, step=0)
        logger.save()
        logger.finalize("success")
        names.append(name)
        if name == "wandb":
            import wandb

            wandb.finish()  # a later job of a multirun must not log into this run
    return names


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
