"""From a training checkpoint to what evaluation needs: the frozen backbone and the run's data.

A probe or an evaluation must see the data the model was trained on, split
the same way (held-out experiments stay held out). The training run wrote its
resolved config next to its checkpoints (``<run>/config.yaml``,
``<run>/checkpoints/*.ckpt``), so by default the data and split come from
there and ``cellrep-probe ckpt_path=...`` needs nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from cellrep.config import DataConfig, SplitConfig
from cellrep.errors import CellrepError
from cellrep.models.backbone import build_backbone

log = logging.getLogger(__name__)
# Where each task keeps its encoder in the state dict: supervised → backbone, mae → mae.encoder.
BACKBONE_PREFIXES = ("backbone.", "mae.encoder.")


def load_backbone(ckpt_path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder of a cellrep task checkpoint (supervised ``backbone``, MAE ``mae.encoder``)."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CellrepError(f"checkpoint {path} does not exist", fix="set ckpt_path to a .ckpt written by cellrep-train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        hparams, state = dict(ckpt["hyper_parameters"]), ckpt["state_dict"]
        model = dict(hparams["model"])
        in_chans = int(hparams["in_chans"])
    except Exception as exc:  # noqa: BLE001 — any failure means "not a cellrep checkpoint"
        raise CellrepError(
            f"{path} is not a readable cellrep checkpoint ({type(exc).__name__}: {exc})",
            fix="use a checkpoint written by cellrep-train (checkpoints/best.ckpt or last.ckpt)",
        ) from None
    prefix = next((p for p in BACKBONE_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise CellrepError(
            f"{path} holds no backbone weights (looked for {list(BACKBONE_PREFIXES)})",
            fix="use a checkpoint of a cellrep task (supervised or mae)",
        )
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    backbone = build_backbone(
        model["name"],
        in_chans=in_chans,
        num_classes=int(hparams.get("num_classes") or 0),
        img_size=model.get("img_size"),
        **dict(model.get("kwargs") or {}),
    )
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CellrepError(
            f"{path}: backbone weights do not fit {model['name']} (missing {missing[:3]}, unexpected {unexpected[:3]})",
            fix="the checkpoint and its hyperparameters disagree",
        )
    return backbone.eval(), {"model": model, "in_chans": in_chans, "num_classes": hparams.get("num_classes")}


def run_config_path(ckpt_path: str | Path) -> Path:
    return Path(ckpt_path).expanduser().resolve().parent.parent / "config.yaml"


def eval_data_config(cfg: DictConfig) -> tuple[DictConfig, DictConfig, int, str]:
    """(data, split, seed, where from): the training run's when ``use_run_config`` and it exists."""
    source = "command line"
    data, split, seed = cfg.data, cfg.split, int(cfg.get("seed", 0))
    if cfg.get("ckpt_path") and cfg.get("use_run_config", True):
        run_cfg = run_config_path(cfg.ckpt_path)
        if run_cfg.is_file():
            run = OmegaConf.load(run_cfg)
            try:
                data = OmegaConf.merge(OmegaConf.structured(DataConfig), run.data)
                split = OmegaConf.merge(OmegaConf.structured(SplitConfig), run.split)
            except Exception as exc:  # noqa: BLE001
                raise CellrepError(
                    f"{run_cfg}: data/split of the training run do not fit the schema: {exc}",
                    fix="set use_run_config=false and give data=... split=... on the command line",
                ) from None
            seed, source = int(run.get("seed", seed)), str(run_cfg)
        else:
            log.warning("no training config at %s: using the data/split of the command line", run_cfg)
    return data, split, seed, source


def build_eval_datamodule(data: DictConfig, split: DictConfig, seed: int, batch_size: int, num_workers: int):
    """Shards (made if needed) + the training split, with evaluation loader settings."""
    from cellrep.data.loading.datamodule import CellDataModule
    from cellrep.data.shards.prepare import ensure_shards

    shards_dir = ensure_shards(data)
    channels = data.channel_names or (data.synthetic.channel_names if data.get("synthetic") else None)
    split_dict = OmegaConf.to_container(split, resolve=True)
    split_dict["name"] = getattr(split.name, "name", split.name)
    return CellDataModule(
        shards_dir,
        split=split_dict,
        batch_size=batch_size,
        num_workers=num_workers,
        crop_size=data.crop_size,
        normalization=getattr(data.normalization, "name", data.normalization),
        label_column=data.label_column,
        expected_channels=len(channels) if channels else None,
        seed=seed,
        max_corrupt=data.get("max_corrupt", 100),
    )


def data_root(data: DictConfig) -> Path | None:
    """The dataset's own folder (the synthetic screen's, which holds compound_targets.csv)."""
    from cellrep.data.shards.prepare import build_source

    try:
        source, _ = build_source(data, progress=False)
    except CellrepError:
        return None
    return getattr(source, "root", None)
