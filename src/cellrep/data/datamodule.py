"""Lightning DataModule over a shards directory (see :mod:`cellrep.data.shards`).

Training streams shards with webdataset: each rank and loader worker draws
shards at random with replacement (``resampled``) from a seed that depends on
(seed, epoch, rank, worker), so every rank yields exactly
``ceil(n_train / (batch_size · world_size))`` batches per epoch whatever the
shard count (no rank starves or hangs DDP), and the stream is reproducible: a
resumed run replays the same batches (``state_dict`` / ``load_state_dict``).

Validation and test are exact: a stage's sites (index order) are cut into one
contiguous block per rank, each block into the same number of batches on
every rank, and samples are read by byte offset from the index, so only the
wanted members are read and the union over ranks is each site exactly once.

Batches are ``{"image": float32 B×C×S×S, "label": int64 B, "index": int64 B}``;
``index`` is the row of :attr:`CellDataModule.index` (any metadata).
"""

from __future__ import annotations

import cellrep  # noqa: F401  (before lightning imports torchvision)

import io
import logging
import math
import os
import random
import tarfile
from enum import Enum
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cellrep.data.shards import load_manifest, plate_key, read_index
from cellrep.data.splits import assign_splits
from cellrep.data.transforms import NORMALIZATIONS, center_crop, normalize, random_crop_flip_rot90
from cellrep.errors import CellrepError

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")


class SkipCounter:
    """A webdataset handler that skips a corrupt member, counts it, warns, and
    raises once more than ``limit`` were skipped in this worker."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipped unreadable shard data (%d so far in this worker): %r", self.count, exn)
        if self.count > self.limit:
            raise CellrepError(f"more than {self.limit} unreadable samples/shards: last was {exn!r}",
                               fix="re-shard the dataset (`cellrep-shard`); shards are corrupt or truncated")
        return True


def _decode(data: bytes, shape: tuple) -> torch.Tensor:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype != np.uint8 or arr.shape != shape:
        raise ValueError(f"sample is {arr.dtype} {arr.shape}, the manifest says uint8 {shape}")
    return torch.from_numpy(arr)


def _npy_members(urls, handler):
    """``{"__key__", "npy"}`` for each ``.npy`` member of each shard in ``urls``, in tar order.

    Random-access tarfile mode reads a member with one ``read()``: ~3× faster than webdataset's
    stream-mode reader, which copies each 1.5 MB member through Python in 10 KB chunks and was the
    loader's largest cost (benchmarks/loader.py, docs/PERFORMANCE.md). Errors go to ``handler`` as
    in webdataset: an unreadable (truncated) shard is counted once and abandoned at that point;
    a member whose bytes are garbled but complete is caught later, by ``_decode``.
    """
    for url in urls:
        try:
            with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not (member.isfile() and member.name.endswith(".npy")):
                        continue
                    data = tar.extractfile(member).read()  # raises ReadError when truncated
                    yield {"__key__": member.name[: -len(".npy")], "npy": data}
        except (OSError, tarfile.TarError) as exn:
            handler(exn)


class _Samples:
    """What both streams share: per-row label/plate, normalization, collation."""

    def __init__(self, dm: "CellDataModule"):
        self.shards_dir, self.shape, self.crop = str(dm.shards_dir), tuple(dm.image_shape), dm.crop_size
        self.mode, self.batch_size, self.max_corrupt = dm.normalization, dm.batch_size, dm.max_corrupt
        self.label = dm.index["label"].to_numpy(np.int64)
        self.plate = dm._plate_idx
        self.mean, self.std = dm._stats_mean, dm._stats_std

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> dict:
        rows = np.array([r for _, r in items], dtype=np.int64)
        plates = torch.from_numpy(self.plate[rows])  # global: every row points at stats 0
        crops = torch.stack([x for x, _ in items])
        # In a loader worker, normalize straight into shared memory: the DataLoader would otherwise copy
        # the float batch (4× the uint8 bytes) into shared memory to send it (docs/PERFORMANCE.md).
        out = torch.empty(crops.shape).share_memory_() if get_worker_info() is not None else None
        image = normalize(crops, self.mode, (self.mean[plates], self.std[plates]), out=out)
        return {"image": image, "label": torch.from_numpy(self.label[rows]), "index": torch.from_numpy(rows)}


class TrainStream(IterableDataset):
    """Endless resampled shard stream of one rank; each worker yields its share of the epoch."""

    def __init__(self, dm: "CellDataModule", rows: np.ndarray, rank: int, world: int):
        self.s = _Samples(dm)
        idx = dm.index.iloc[rows]
        self.urls = sorted({os.path.join(self.s.shards_dir, n) for n in idx["shard"]})
        self.keys = dict(zip(idx["key"], rows.tolist()))  # also the select stage: only this stage's keys
        self.rank, self.seed, self.shuffle_buffer = rank, dm.seed, dm.shuffle_buffer
        self.num_batches = math.ceil(len(rows) / (dm.batch_size * world))
        self.state = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, batches to skip)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info else (0, 1)
        epoch, skip = (int(v) for v in self.state)
        # The DataLoader takes batches from workers round-robin, starting at worker 0: batch i of the
        # epoch comes from stream i % nw. After resuming at batch `skip`, worker w plays stream
        # (w + skip) % nw, so the batch order is that of the uninterrupted run (same num_workers).
        stream_id = (worker + skip) % nw
        mine = self.num_batches // nw + (stream_id < self.num_batches % nw)
        skip_mine = skip // nw + (stream_id < skip % nw)
        seed = hash((self.seed, epoch, self.rank, stream_id)) & 0xFFFFFFFF
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        errors = SkipCounter(self.s.max_corrupt)
        urls = (rng.choice(self.urls) for _ in iter(int, 1))  # resampled: endless
        samples = _npy_members(urls, errors)
        crops = self._augmented(samples, gen, errors)
        # crop before shuffling so the buffer holds small uint8 crops
        stream = wds.filters._shuffle(crops, self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)
        for _ in range(skip_mine * self.s.batch_size):  # resume: replay the stream up to the saved position
            next(stream)
        for _ in range(mine - skip_mine):
            yield self.s.collate([next(stream) for _ in range(self.s.batch_size)])

    def _augmented(self, samples, gen, errors):
        for sample in samples:
            row = self.keys.get(sample["__key__"])
            if row is None or "npy" not in sample:
                continue
            try:
                img = _decode(sample["npy"], self.s.shape)
            except Exception as exn:  # noqa: BLE001 — a corrupt member is skipped and counted
                errors(exn)
                continue
            yield random_crop_flip_rot90(img, self.s.crop, gen).contiguous(), row


class EvalStream(IterableDataset):
    """A rank's fixed batches of one stage, read by byte offset; worker w takes batches w, w+nw, ..."""

    def __init__(self, dm: "CellDataModule", rows: np.ndarray, rank: int, world: int):
        self.s = _Samples(dm)
        n = len(rows)
        block = rows[rank * n // world:(rank + 1) * n // world]
        nb = math.ceil(math.ceil(n / world) / dm.batch_size) if n else 0
        # same batch count on every rank (sizes differ by at most one), so per-step collectives line up
        self.batches = [b for b in np.array_split(block, nb)] if nb else []
        if any(len(b) == 0 for b in self.batches):
            log.warning("rank %d has fewer samples (%d) than batches (%d): ranks get unequal batch counts",
                        rank, len(block), nb)
            self.batches = [b for b in self.batches if len(b)]
        self.shard = dm.index["shard"].to_numpy(object)
        self.offset = dm.index["npy_offset"].to_numpy(np.int64)
        self.size = dm.index["npy_size"].to_numpy(np.int64)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info else (0, 1)
        errors, files = SkipCounter(self.s.max_corrupt), {}
        try:
            for batch in self.batches[worker::nw]:
                items = []
                for row in batch.tolist():
                    try:
                        img = _decode(self._read(files, row), self.s.shape)
                    except Exception as exn:  # noqa: BLE001 — skipped and counted
                        errors(exn)
                        continue
                    items.append((center_crop(img, self.s.crop), row))
                if items:
                    yield self.s.collate(items)
        finally:
            for fd in files.values():
                os.close(fd)

    def _read(self, files: dict, row: int) -> bytes:
        name = self.shard[row]
        if name not in files:
            files[name] = os.open(os.path.join(self.s.shards_dir, name), os.O_RDONLY)
        data = os.pread(files[name], int(self.size[row]), int(self.offset[row]))
        if len(data) != self.size[row]:
            raise OSError(f"{name} is truncated (row {row})")
        return data


class EvalLoader:
    """A DataLoader over :class:`EvalStream` with a length (a plain iterable to Lightning, which
    therefore neither injects a sampler nor warns about sized IterableDatasets)."""

    def __init__(self, stream: EvalStream, num_workers: int, pin_memory: bool):
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=min(num_workers, len(stream)),
                                 pin_memory=pin_memory, worker_init_fn=_one_thread)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        return iter(self.loader)


class TrainLoader:
    """The training loader: a DataLoader over :class:`TrainStream` with a length, an
    epoch counter and a resumable position (Lightning saves ``state_dict()`` in checkpoints).

    The position is the number of batches handed out. Lightning does not
    prefetch from a loader that has a length, so at a checkpoint taken after a
    training step that equals the steps done in this epoch.
    """

    def __init__(self, stream: TrainStream, num_workers: int, persistent_workers: bool, pin_memory: bool):
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=persistent_workers and num_workers > 0,
                                 worker_init_fn=_one_thread)
        self.epoch, self.yielded, self._resume = -1, 0, None

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        epoch, skip = self._resume if self._resume else (self.epoch + 1, 0)
        self._resume = None
        self.epoch, self.yielded = epoch, skip
        self.stream.state[0], self.stream.state[1] = epoch, skip
        for batch in self.loader:
            self.yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": max(self.epoch, 0), "batches": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        epoch, done = int(state["epoch"]), int(state["batches"])
        self._resume = (epoch + 1, 0) if done >= len(self) else (epoch, done)


_SPLIT_KEYS = {"name", "test_fraction", "val_fraction", "holdout", "shots", "seed"}


def _plain(v):
    """Structured configs hand enums (SplitName.batch); the code wants their names."""
    return v.name if isinstance(v, Enum) else v


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers do small per-sample ops; avoid oversubscribing cores


class CellDataModule(L.LightningDataModule):
    """Shards + split config → train/val/test loaders (see module docstring)."""

    def __init__(self, shards_dir, split: dict, batch_size: int = 64, num_workers: int = 2, crop_size: int = 48,
                 normalization: str = "plate_controls", label_column: str = "perturbation",
                 expected_channels: int | None = None, seed: int = 0, shuffle_buffer: int = 512,
                 max_corrupt: int = 100, persistent_workers: bool = False, pin_memory: bool | None = None):
        super().__init__()
        self.shards_dir, self.split = Path(shards_dir), {k: _plain(v) for k, v in dict(split).items()}
        self.batch_size, self.num_workers, self.crop_size = int(batch_size), int(num_workers), int(crop_size)
        self.normalization, self.label_column = str(_plain(normalization)), str(label_column)
        self.expected_channels, self.seed = expected_channels, int(seed)
        self.shuffle_buffer, self.max_corrupt = max(int(shuffle_buffer), 1), int(max_corrupt)
        self.persistent_workers = persistent_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prepare()

    def prepare(self) -> None:
        """Load manifest + index, check them against the config, assign splits and labels."""
        self.manifest = load_manifest(self.shards_dir)
        self.channel_names = list(self.manifest["channel_names"])
        self.in_chans, self.image_shape = len(self.channel_names), tuple(self.manifest["image_shape"])
        if self.expected_channels is not None and int(self.expected_channels) != self.in_chans:
            raise CellrepError(
                f"images have {self.in_chans} channels ({self.channel_names}) but the config expects "
                f"{self.expected_channels}",
                fix="set data.channel_names/model in_chans to match the shards, or re-shard the dataset")
        if self.normalization not in NORMALIZATIONS:
            raise CellrepError(f"unknown normalization '{self.normalization}'",
                               fix=f"set data.normalization to one of {list(NORMALIZATIONS)}")
        if self.batch_size < 1:
            raise CellrepError(f"batch_size={self.batch_size}", fix="use a positive data.batch_size")
        if not 1 <= self.crop_size <= min(self.image_shape[1:]):
            raise CellrepError(f"crop size {self.crop_size} does not fit images of "
                               f"{self.image_shape[1]}×{self.image_shape[2]}",
                               fix=f"set data.crop_size to at most {min(self.image_shape[1:])}")
        index = read_index(self.shards_dir)
        if self.label_column not in index.columns:
            raise CellrepError(f"label column '{self.label_column}' is not in the metadata",
                               fix=f"set data.label_column to one of {list(index.columns)}")
        if index[self.label_column].isna().any():
            raise CellrepError(f"label column '{self.label_column}' is empty for "
                               f"{int(index[self.label_column].isna().sum())} site(s)",
                               fix="choose a label column with a value for every site (e.g. perturbation)")
        unknown = set(self.split) - _SPLIT_KEYS
        if unknown or "name" not in self.split:
            raise CellrepError(f"split config needs 'name' and may have {sorted(_SPLIT_KEYS - {'name'})}; "
                               f"got {sorted(self.split)}", fix="use one of the split/ configs")
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
        log.info("data: %d sites, %d classes, %d channels; split %s: %s", len(index), self.num_classes,
                 self.in_chans, self.split.get("name"), self.split_counts)

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
                raise CellrepError(f"manifest has no control stats for plate {missing[0]}",
                                   fix="re-shard the dataset (`cellrep-shard`)")
            stats = [self.manifest["plate_stats"].get(k, self.manifest["global_stats"]) for k in names]
            pos = {k: i for i, k in enumerate(names)}
            self._plate_idx = np.array([pos[k] for k in keys], dtype=np.int64)
        self._stats_mean = torch.tensor([s["mean"] for s in stats], dtype=torch.float32).view(-1, c)
        self._stats_std = torch.tensor([s["std"] for s in stats], dtype=torch.float32).view(-1, c)

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
        return TrainLoader(stream, self.num_workers, self.persistent_workers, self.pin_memory)

    def eval_dataloader(self, stage: str = "test") -> EvalLoader:
        """Exact loader over ``stage`` ("train", "val", "test" or "all"), center crops, no augmentation."""
        if stage not in self._stage_rows:
            raise CellrepError(f"unknown stage '{stage}'", fix=f"use one of {list(self._stage_rows)}")
        rank, world = self._dist()
        return EvalLoader(EvalStream(self, self._stage_rows[stage], rank, world), self.num_workers,
                          self.pin_memory)

    def val_dataloader(self) -> EvalLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> EvalLoader:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> EvalLoader:
        return self.eval_dataloader("test")
