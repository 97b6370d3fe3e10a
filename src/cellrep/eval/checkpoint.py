"""From a training checkpoint to what evaluation needs: the run's data, split as in training.

The frozen backbone itself comes from :func:`cellrep.models.checkpoint.load_backbone`,
the one reader of cellrep checkpoints.

A probe or an evaluation must see the data the model was trained on, split
the same way (held-out experiments stay held out). The training run wrote its
resolved config next to its checkpoints (``<run>/config.yaml``,
``<run>/checkpoints/*.ckpt``), so by default the data and split come from
there and ``cellrep-probe ckpt_path=...`` needs nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cellrep.config import DataConfig, SplitConfig
from cellrep.errors import CellrepError

log = logging.getLogger(__name__)


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
    """(datamodule, prepared shards): shards made if needed + the training split, with evaluation loader settings.

    The prepared shards also say where the dataset itself lives (``dataset_root``: the synthetic
    screen's folder holds compound_targets.csv), so the source is opened once.
    """
    from cellrep.data.loading.datamodule import CellDataModule
    from cellrep.data.shards.prepare import ensure_shards

    shards = ensure_shards(data)
    dm = CellDataModule.from_config(
        shards.shards_dir, data, split, seed, batch_size=batch_size, num_workers=num_workers, augment_on_device=None
    )
    return dm, shards
