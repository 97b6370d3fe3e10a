"""Lightning DataModule over a shards directory (see :mod:`cellrep.data.shards.writer`): the split, the
labels and per-plate statistics; the loaders read shards through :mod:`cellrep.data.loading.streams`
(resampled, resumable training stream; exact, rank-partitioned evaluation).

Loader batches are ``{"image": uint8 B×C×S×S, "label": int64 B, "index": int64 B, "plate": int64 B}``,
training batches also ``"flip_rot": uint8 B×3``; ``index`` is the row of :attr:`CellDataModule.index`
(any metadata), ``plate`` the sample's row of normalization statistics, ``flip_rot`` each crop's drawn
flips and quarter turns. Workers ship plain uint8 crops (a quarter of float32's bytes, no float work
and no strided copies on the CPU); :meth:`CellDataModule.finish_batch` flips/rotates and normalizes
the batch on the device, vectorized. Lightning runs it in ``on_after_batch_transfer``; anything that
iterates the loaders itself calls it (or the loader's ``finish_batch``, the same function). Without
CUDA (``augment_on_device`` false) the workers flip and rotate, and training batches carry no
``flip_rot``. With ``channel_sampling`` finished training batches keep a random channel subset and
carry ``"channel_ids"`` (int64 k; :class:`~cellrep.data.loading.transforms.BatchFinisher`).
"""

from __future__ import annotations

import cellrep  # noqa: F401  (before lightning imports torchvision)

# isort: split
import copy
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from cellrep.data.loading.splits import assign_splits
from cellrep.data.loading.streams import EvalLoader, EvalStream, TrainLoader, TrainStream
from cellrep.data.loading.transforms import BatchFinisher, check_normalization
from cellrep.data.shards.writer import load_manifest, plate_key, read_index
from cellrep.errors import CellrepError

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")


_SPLIT_KEYS = {"name", "test_fraction", "val_fraction", "holdout", "shots", "seed"}


class CellDataModule(L.LightningDataModule):
    """Shards + split config → train/val/test loaders (see module docstring)."""

    def __init__(
        self,
        shards_dir,
        split: dict,
        batch_size: int = 64,
        num_workers: int = 2,
        crop_size: int = 48,
        normalization: str = "plate_controls",
        label_column: str = "perturbation",
        expected_channels: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 512,
        max_corrupt: int = 100,
        persistent_workers: bool = False,
        pin_memory: bool | None = None,
        augment_on_device: bool | None = None,
        channel_sampling: bool = False,
    ):
        super().__init__()
        # training batches see one random channel subset each (BatchFinisher; channel-agnostic models only)
        self.channel_sampling = bool(channel_sampling)
        self.shards_dir, self.split = Path(shards_dir), dict(split)
        self.batch_size, self.num_workers, self.crop_size = int(batch_size), int(num_workers), int(crop_size)
        self.normalization, self.label_column = str(normalization), str(label_column)
        self.expected_channels, self.seed = expected_channels, int(seed)
        self.shuffle_buffer, self.max_corrupt = max(int(shuffle_buffer), 1), int(max_corrupt)
        self.persistent_workers = persistent_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # training flips/rot90: in finish_batch on the device, or (CPU-only training) in the workers
        self.augment_on_device = torch.cuda.is_available() if augment_on_device is None else augment_on_device
        self.prepare()

    @classmethod
    def from_config(cls, shards_dir, data, split, seed: int, **loader) -> "CellDataModule":
        """The datamodule of a run's ``data`` and ``split`` config nodes (training and evaluation alike);
        ``loader`` overrides loader settings (evaluation: its own ``batch_size``/``num_workers``)."""
        channels = data.channel_names or (data.synthetic.channel_names if data.get("synthetic") else None)
        settings = {
            "batch_size": data.batch_size,
            "num_workers": data.num_workers,
            "crop_size": data.crop_size,
            "normalization": data.normalization,
            "label_column": data.label_column,
            "expected_channels": len(channels) if channels else None,
            "max_corrupt": data.max_corrupt,
            "augment_on_device": data.get("augment_on_device"),
            "channel_sampling": bool(data.get("channel_sampling", False)),
        }
        split = split if isinstance(split, dict) else OmegaConf.to_container(split, resolve=True)
        return cls(shards_dir, split=split, seed=seed, **{**settings, **loader})

    def prepare(self) -> None:
        """Load manifest + index, check them against the config, assign splits and labels."""
        self.manifest = load_manifest(self.shards_dir)
        self.channel_names = list(self.manifest["channel_names"])
        self.in_chans, self.image_shape = len(self.channel_names), tuple(self.manifest["image_shape"])
        if self.expected_channels is not None and int(self.expected_channels) != self.in_chans:
            raise CellrepError(
                f"images have {self.in_chans} channels ({self.channel_names}) but the config expects "
                f"{self.expected_channels}",
                fix="set data.channel_names/model in_chans to match the shards, or re-shard the dataset",
            )
        check_normalization(self.normalization)
        if self.batch_size < 1:
            raise CellrepError(f"batch_size={self.batch_size}", fix="use a positive data.batch_size")
        if not 1 <= self.crop_size <= min(self.image_shape[1:]):
            raise CellrepError(
                f"crop size {self.crop_size} does not fit images of {self.image_shape[1]}×{self.image_shape[2]}",
                fix=f"set data.crop_size to at most {min(self.image_shape[1:])}",
            )
        index = read_index(self.shards_dir)
        if self.label_column not in index.columns:
            raise CellrepError(
                f"label column '{self.label_column}' is not in the metadata",
                fix=f"set data.label_column to one of {list(index.columns)}",
            )
        if index[self.label_column].isna().any():
            raise CellrepError(
                f"label column '{self.label_column}' is empty for {int(index[self.label_column].isna().sum())} site(s)",
                fix="choose a label column with a value for every site (e.g. perturbation)",
            )
        unknown = set(self.split) - _SPLIT_KEYS
        if unknown or "name" not in self.split:
            raise CellrepError(
                f"split config needs 'name' and may have {sorted(_SPLIT_KEYS - {'name'})}; got {sorted(self.split)}",
                fix="use one of the split/ configs",
            )
        kw = {k: v for k, v in self.split.items() if k != "name"}
        index["split"] = assign_splits(index, str(self.split["name"]), **kw)
        labels = index[self.label_column].astype(str)
        self.class_names = sorted(labels.unique())
        self.num_classes = len(self.class_names)
        index["label"] = pd.Categorical(labels, categories=self.class_names).codes.astype(np.int64)
        self.index = index
        self.split_counts = {s: int((index["split"] == s).sum()) for s in STAGES}
        self._stage_rows = {s: np.flatnonzero((index["split"] == s).to_numpy()) for s in STAGES}
        self._stage_rows["all"] = np.arange(len(index))
        self._set_stats(index)
        log.info(
            "data: %d sites, %d classes, %d channels; split %s: %s",
            len(index),
            self.num_classes,
            self.in_chans,
            self.split.get("name"),
            self.split_counts,
        )

    def with_train_rows(self, rows: np.ndarray) -> "CellDataModule":
        """A shallow copy whose training stage is ``rows`` (rows of ``self.index``); validation and
        test unchanged. Shares index, statistics and shards (the de novo protocol trains in phases)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            raise CellrepError(
                "a training phase has no sites",
                fix="check split.holdout and split.shots (each phase needs training sites)",
            )
        view = copy.copy(self)
        view._stage_rows = {**self._stage_rows, "train": rows}
        return view

    def _set_stats(self, index: pd.DataFrame) -> None:
        c = self.in_chans
        if self.normalization == "global":
            stats = [self.manifest["global_stats"]]
            self._plate_idx = np.zeros(len(index), dtype=np.int64)
        else:
            keys = [plate_key(e, p) for e, p in zip(index["experiment"], index["plate"])]
            names = sorted(set(keys))
            missing = [k for k in names if k not in self.manifest["plate_stats"]]
            if missing and self.normalization == "plate_controls":
                raise CellrepError(
                    f"manifest has no control stats for plate {missing[0]}",
                    fix="re-shard the dataset (`cellrep-shard`)",
                )
            stats = [self.manifest["plate_stats"].get(k, self.manifest["global_stats"]) for k in names]
            pos = {k: i for i, k in enumerate(names)}
            self._plate_idx = np.array([pos[k] for k in keys], dtype=np.int64)
        self._stats_mean = torch.tensor([s["mean"] for s in stats], dtype=torch.float32).view(-1, c)
        self._stats_std = torch.tensor([s["std"] for s in stats], dtype=torch.float32).view(-1, c)
        self._finisher = BatchFinisher(self.normalization, self._stats_mean, self._stats_std, seed=self.seed)
        self._train_finisher = self._finisher.with_channels(channel_sampling=self.channel_sampling)

    def set_eval_channels(self, keep: list[int] | None = None, zero: list[int] | None = None) -> None:
        """Evaluation batches (loaders made from now on) keep only ``keep`` channels or have ``zero``
        channels zeroed after normalization (cellrep.eval.channels); ``None``/``None``: all channels."""
        self._finisher = self._finisher.with_channels(keep=keep, zero=zero)

    def finish_batch(self, batch: dict) -> dict:
        """A loader batch (uint8 ``image``, on any device) → the same batch with a float32 normalized image
        (training crops flipped and rotated first, as drawn: ``flip_rot``).

        Lightning calls it after moving each batch to the device (:meth:`on_after_batch_transfer`); code
        that iterates this module's loaders itself calls it too (or the loader's ``finish_batch``, the
        same function), so every consumer sees the same values: per-sample :func:`normalize` with the
        sample's plate statistics (docs/data.md Normalization), computed once per batch on the device.
        """
        return self._finisher(batch)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:  # only training batches sample channels
            return self._train_finisher(batch)
        return self.finish_batch(batch)

    def _dist(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def train_dataloader(self) -> TrainLoader:
        rank, world = self._dist()
        stream = TrainStream(self, self._stage_rows["train"], rank, world)
        return TrainLoader(stream, self.num_workers, self.persistent_workers, self.pin_memory, self._train_finisher)

    def eval_dataloader(self, stage: str = "test", rows: np.ndarray | None = None) -> EvalLoader:
        """Exact loader over ``stage`` ("train", "val", "test" or "all"), center crops, no augmentation;
        ``rows``: only these index rows of the stage (what a resumed multi-process embedding still lacks)."""
        if stage not in self._stage_rows:
            raise CellrepError(f"unknown stage '{stage}'", fix=f"use one of {list(self._stage_rows)}")
        stage_rows = self._stage_rows[stage]
        if rows is not None:
            stage_rows = stage_rows[np.isin(stage_rows, rows)]
        rank, world = self._dist()
        return EvalLoader(EvalStream(self, stage_rows, rank, world), self.num_workers, self.pin_memory, self._finisher)

    def val_dataloader(self) -> EvalLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> EvalLoader:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> EvalLoader:
        return self.eval_dataloader("test")
