"""From a training checkpoint to what evaluation needs: the run's data, split as in training.

The frozen backbone itself comes from :func:`cellrep.models.checkpoint.load_backbone`,
the one reader of cellrep checkpoints.

A probe or an evaluation must see the data the model was trained on, split
the same way (held-out experiments stay held out). The training run wrote its
resolved config next to its checkpoints (``<run>/config.yaml``,
``<run>/checkpoints/*.ckpt``), so by default the data and split come from
there and ``cellrep-probe ckpt_path=...`` needs nothing else.

A run trained with a cell-type context (docs/FEWSHOT.md) is evaluated with it, as it was
trained (:func:`checkpoint_context`): the projection from the checkpoint, the table from
the run (its ``model.context_path``, or the ``context.csv`` a ``synthetic`` run wrote), each
site's vector picked by its cell type's *name*, so a de novo cell type needs only its
row in the table. ``context=false`` embeds the encoder alone (an ablation).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cellrep.config import DataConfig, SplitConfig
from cellrep.errors import CellrepError
from cellrep.eval.features import SiteContext
from cellrep.knowledge.context import read_context
from cellrep.models.checkpoint import load_context, read_checkpoint

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


def checkpoint_context(cfg: DictConfig, backbone, dm, model: dict) -> tuple[SiteContext | None, dict]:
    """(the checkpoint's cell-type context over ``dm``'s sites or None, what metrics.json records of it).

    ``model``: the run's model settings (``load_backbone``'s meta); only a run with a ``context_path``
    has a context, so no other checkpoint is read a second time.
    """
    none = {"in_checkpoint": False, "used": False}
    if not cfg.get("ckpt_path") or not model.get("context_path"):
        return None, none
    ckpt = read_checkpoint(cfg.ckpt_path)
    if not ckpt.context_weights():
        return None, none
    override = (cfg.get("model") or {}).get("context_path")
    path = Path(str(override)).expanduser() if override else ckpt.context_table_path()
    record = {"in_checkpoint": True, "used": False, "table": str(path)}
    if not cfg.get("context", True):
        log.info("context=false: embedding %s without its cell-type context (an ablation)", cfg.ckpt_path)
        return None, record
    fix = "pass model.context_path=<csv> (cell_type,v0,v1,... as in training), or context=false to embed without it"
    if path is None or not path.is_file():
        raise CellrepError(
            f"{cfg.ckpt_path} was trained with a cell-type context and its table {path} is missing", fix=fix
        )
    table = read_context(path)
    names = [str(c) for c in dm.index["cell_type"]]
    missing = sorted(set(names) - set(table.index))
    if missing:
        raise CellrepError(
            f"cell type(s) {missing} of the evaluated sites have no context vector in {path} (it has {list(table.index)})",
            fix=f"add a row per cell type to {path} (or pass model.context_path=<csv> with them): the vector "
            "describes the cell line to the model; or context=false to embed without it",
        )
    module = load_context(ckpt, backbone, torch.from_numpy(table.to_numpy()))
    row = {name: i for i, name in enumerate(table.index)}
    context = SiteContext(module, torch.tensor([row[n] for n in names], dtype=torch.long))
    applied = context.conditions_blocks
    log.info("embedding with the cell-type context (%s, table %s)", module.mode, path)
    record.update(used=applied, mode=module.mode)
    if not applied:
        record["note"] = "FiLM conditions the classifier's input after the last block: block features are unchanged"
    return (context if applied else None), record


def context_line(record: dict | None) -> str:
    """The report's words for :func:`checkpoint_context`'s record."""
    if not record or not record.get("in_checkpoint"):
        return "none (the model was trained without one)"
    if record.get("used"):
        return f"used: a {record['mode']} in every block, vectors from {record['table']}"
    if record.get("mode") == "film":
        return "FiLM (after the last block): block features are the encoder's alone"
    return "off (context=false): the encoder alone, an ablation"
