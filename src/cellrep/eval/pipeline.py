"""Checkpoint → per-block features → probes and/or well embeddings, in one backbone pass.

Shared by ``cellrep-probe`` and ``cellrep-eval``: with ``block=best`` the
evaluation probes every block and embeds with the winner from the same
features, so choosing the block costs no second pass over the images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from cellrep.errors import CellrepError
from cellrep.eval.channels import match_channels
from cellrep.eval.checkpoint import build_eval_datamodule, checkpoint_context, eval_data_config
from cellrep.eval.embeddings import Embeddings, aggregate_wells
from cellrep.eval.features import BlockFeatures, SiteContext, block_names, extract_block_features, resolve_block
from cellrep.eval.probe import ProbeResult, ProbeSettings, train_probes
from cellrep.eval.ranks import features_across_ranks
from cellrep.models.checkpoint import load_backbone
from cellrep.models.pretrained import load_published_encoder, published_normalization

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    backbone: torch.nn.Module
    datamodule: object
    device: torch.device
    model: dict
    data_source: str  # where data/split came from
    dataset_root: Path | None
    trainer: dict | None = None  # trainer=ddp ...: embed with these Lightning Trainer settings (eval/ranks.py)
    run_dir: Path | None = None  # where the ranks' feature parts go (with trainer)
    source: str = ""  # what is embedded (a checkpoint path), recorded with the parts
    context: SiteContext | None = None  # the checkpoint's cell-type context, when it conditions the features
    context_record: dict | None = None  # metrics.json's "context": in the checkpoint, used, mode, table


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare(cfg: DictConfig) -> Prepared:
    """Load the backbone and the training run's data (split included) for evaluation.

    With ``encoder=`` (a published encoder, docs/encoders.md) data and split come from the command
    line, the encoder is built for the data's channels and crop, and the normalization it was trained
    with (OpenPhenom: per image) replaces ``data.normalization``.
    """
    if not cfg.get("encoder"):
        backbone, meta = load_backbone(cfg.ckpt_path)
    data, split, seed, source = eval_data_config(cfg)
    if cfg.get("encoder"):
        norm = published_normalization(cfg.encoder)
        if norm is not None and norm != data.normalization:
            log.info("%s expects data.normalization=%s (not %s): using it", cfg.encoder, norm, data.normalization)
            data = OmegaConf.merge(data, {"normalization": norm})
    dm, shards = build_eval_datamodule(data, split, seed, cfg.loader.batch_size, cfg.loader.num_workers)
    if cfg.get("encoder"):
        backbone, meta = load_published_encoder(
            cfg.encoder, cfg.get("encoder_model"), dm.in_chans, cfg.get("encoder_channels"), int(data.crop_size)
        )
    # a CA-ViT maps the data's channels by name (any subset of its training channels); a fixed-channel
    # model needs its channel count; channels=[...]: only those (eval/channels.py)
    match_channels(backbone, meta, dm, model_file(cfg), cfg.get("channels"))
    log.info("evaluating %s on %d sites (data/split from %s)", meta["model"]["name"], len(dm.index), source)
    context, record = checkpoint_context(cfg, backbone, dm, meta["model"])  # embed as trained (eval/checkpoint.py)
    prep = Prepared(backbone, dm, pick_device(cfg.device), meta["model"], source, shards.dataset_root)
    prep.context, prep.context_record = context, record
    return prep


def model_file(cfg: DictConfig) -> str:
    """What is evaluated: the checkpoint, or the published encoder (recorded in metrics and reports)."""
    return str(cfg.get("ckpt_path") or cfg.get("encoder"))


def across_ranks(prep: Prepared, cfg: DictConfig, run_dir: Path) -> Prepared:
    """With a ``trainer`` group (``trainer=ddp trainer.devices=N``), features come from all its ranks."""
    if cfg.get("trainer"):
        prep.trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
        prep.run_dir, prep.source = Path(run_dir), model_file(cfg)
    return prep


def block_features(prep: Prepared, blocks: list[int] | None, progress: bool) -> BlockFeatures:
    """Pooled features of ``blocks`` (None: all) for every site, in this process or across the ranks."""
    if prep.trainer is not None:
        return features_across_ranks(
            prep.backbone, prep.datamodule, blocks, prep.trainer, prep.run_dir, prep.source, progress, prep.context
        )
    loader = prep.datamodule.eval_dataloader("all")
    return extract_block_features(prep.backbone, loader, blocks, prep.device, progress, prep.context)


def site_frame(dm, rows) -> pd.DataFrame:
    """Metadata of the given index rows (with their train/val/test split)."""
    return dm.index.iloc[rows].reset_index(drop=True)


def probe_settings(cfg: DictConfig) -> ProbeSettings:
    p = cfg.probe
    return ProbeSettings(
        lrs=tuple(float(x) for x in p.lrs),
        epochs=int(p.epochs),
        batch_size=int(p.batch_size),
        weight_decay=float(p.weight_decay),
        knn=bool(p.get("knn", True)),
        seed=int(cfg.seed),
    )


def probe_all_blocks(
    prep: Prepared, settings: ProbeSettings, progress: bool = True
) -> tuple[BlockFeatures, pd.DataFrame, ProbeResult]:
    """docs/benchmarks.md: one backbone pass over every site records each block; probes train on cached features."""
    feats = block_features(prep, None, progress)
    sites = site_frame(prep.datamodule, feats.rows)
    result = train_probes(
        feats.features,
        sites["label"].to_numpy(),
        sites["split"].to_numpy(),
        prep.datamodule.num_classes,
        settings,
        progress=progress,
    )
    return feats, sites, result


def best_block_from_file(path: str | Path) -> str:
    path = Path(path).expanduser()
    try:
        return str(json.loads(path.read_text())["best_block"])
    except (OSError, ValueError, KeyError) as exc:
        raise CellrepError(
            f"cannot read the best block from {path}: {exc}",
            fix="pass probe_results=<run>/probe.json written by cellrep-probe",
        ) from None


def embed_checkpoint(
    cfg: DictConfig, prep: Prepared, progress: bool = True
) -> tuple[Embeddings, str, ProbeResult | None]:
    """Well embeddings from the block chosen by ``cfg.block`` (index, name, last, best)."""
    names = block_names(prep.backbone)
    block, result = str(cfg.block), None
    if block == "best" and cfg.get("probe_results"):
        block = best_block_from_file(cfg.probe_results)
    if block == "best":
        feats, sites, result = probe_all_blocks(prep, probe_settings(cfg), progress)
        name = result.best_block
        log.info("best block on validation: %s", name)
    else:
        k = resolve_block(prep.backbone, -1 if block == "last" else block)
        name = names[k]
        feats = block_features(prep, [k], progress)
        sites = site_frame(prep.datamodule, feats.rows)
    return aggregate_wells(feats.features[name], sites), name, result
