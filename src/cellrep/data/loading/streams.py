"""Reading shards for the loaders (used by :class:`cellrep.data.loading.datamodule.CellDataModule`).

Training draws shards at random with replacement (resampled) from a seed that
depends on (seed, epoch, rank, worker stream), so every rank yields exactly
``ceil(n_train / (batch_size · world_size))`` batches per epoch whatever the
shard count (no rank starves or hangs DDP), and the stream is reproducible: a
resumed run replays the same batches (:class:`TrainLoader` ``state_dict``).

Validation and test are exact: a stage's sites (index order) are cut into one
contiguous block per rank, each block into the same number of batches on
every rank, and samples are read by byte offset from the index, so only the
wanted members are read and the union over ranks is each site exactly once.

Samples are sliced out of memory-mapped shards at the byte ranges the index
records; corrupt members and truncated shards are skipped and counted
(:class:`SkipCounter`, an error above ``max_corrupt``).
"""

from __future__ import annotations

import io
import logging
import math
import mmap
import os
import random
import tarfile

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cellrep.data.loading.batch_ring import BatchRing, RingImage, batch_buffer
from cellrep.data.loading.transforms import BatchFinisher, center_crop, flip_rot90_view, random_crop_view
from cellrep.data.shards.codecs import CODECS, manifest_encoding
from cellrep.errors import CellrepError

log = logging.getLogger(__name__)


class SkipCounter:
    """A webdataset handler that skips a corrupt member, counts it, warns, and
    raises once more than ``limit`` were skipped in this worker."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipped unreadable shard data (%d so far in this worker): %r", self.count, exn)
        if self.count > self.limit:
            raise CellrepError(
                f"more than {self.limit} unreadable samples/shards: last was {exn!r}",
                fix="re-shard the dataset (`cellrep-shard`); shards are corrupt or truncated",
            )
        return True


def _npy_header(shape: tuple) -> bytes:
    """The exact ``.npy`` header ``np.save`` (the shard writer) writes for a C-ordered uint8 array of ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _decode(data, shape: tuple, header: bytes, encoding: str = "npy") -> np.ndarray:
    """A sample's ``.npy`` bytes (any buffer: bytes, a memoryview of a mapped shard) → a C×H×W uint8 array.

    When the bytes start with the header every shard sample has (``header``, see :func:`_npy_header`), the
    array is a zero-copy view of ``data``: no header parsing, no 1.5 MB copy per sample. Anything else is
    parsed by ``np.load``, which raises ``ValueError`` on garbage (then skipped and counted). Another
    ``encoding`` (the manifest's) is decoded by its codec (:mod:`cellrep.data.shards.codecs`).
    """
    if encoding != "npy":
        return CODECS[encoding].decode(data, shape)
    n = math.prod(shape)
    view = memoryview(data)
    if len(view) == len(header) + n and view[: len(header)] == header:
        return np.frombuffer(view, np.uint8, count=n, offset=len(header)).reshape(shape)
    arr = np.load(io.BytesIO(bytes(view)), allow_pickle=False)
    if arr.dtype != np.uint8 or arr.shape != shape:
        raise ValueError(f"sample is {arr.dtype} {arr.shape}, the manifest says uint8 {shape}")
    return arr


def _named(exn: Exception, shard: str, key: str) -> ValueError:
    """A sample that did not decode, named by its shard and key (what the warning and the error show)."""
    return ValueError(f"{os.path.basename(shard)}, sample {key}: {type(exn).__name__}: {exn}")


def _map(path: str) -> mmap.mmap:
    """A read-only mapping of a shard: samples are sliced out of the page cache with no read() copy.

    Shards are immutable once written (written to a temp name, then renamed), so a mapped file does not
    shrink under the reader; one truncated *before* it is mapped is detected by :func:`_member_bytes`.
    The mapping is unmapped when the last view of it is gone.
    """
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError when the file is empty


def _member_bytes(mapped: mmap.mmap, name: str, offset: int, size: int) -> memoryview:
    if offset + size > len(mapped):
        raise tarfile.ReadError(
            f"{name} is truncated: a sample ends at byte {offset + size}, the file has {len(mapped)}"
        )
    return memoryview(mapped)[offset : offset + size]


def _shard_samples(shards, handler, shape: tuple, header: bytes, encoding: str = "npy", keys=None):
    """``(row, C×H×W uint8 view)`` for each ``(path, rows, offsets, sizes)`` of ``shards`` (rows in tar
    order, with their ``.npy`` byte ranges from the index), sliced from a mapping of the shard.

    Errors go to ``handler`` (a :class:`SkipCounter`): an unreadable or truncated shard is counted once and
    abandoned at that point, as a tar reader would; a member whose bytes are garbled is counted and skipped
    (named by ``keys[row]``, the index's ``key`` column, when given).
    Replaces reading the tar member by member (webdataset's stream mode, then ``tarfile``): the index
    already holds every member's offset, and a view costs no copy (docs/PERFORMANCE.md).
    """
    for path, rows, offsets, sizes in shards:
        try:
            mapped = _map(path)
        except (OSError, ValueError) as exn:
            handler(exn)
            continue
        for row, off, size in zip(rows, offsets, sizes):
            try:
                data = _member_bytes(mapped, path, off, size)
            except tarfile.ReadError as exn:
                handler(exn)
                break
            try:
                yield row, _decode(data, shape, header, encoding)
            except Exception as exn:  # noqa: BLE001 — a corrupt member is skipped and counted
                handler(_named(exn, path, keys[row] if keys is not None else f"row {row}"))


class _Samples:
    """What both streams share: per-row label/plate, the sample header, collation."""

    def __init__(self, dm):  # dm: the CellDataModule (not imported: it imports this module)
        self.shards_dir, self.shape, self.crop = str(dm.shards_dir), tuple(dm.image_shape), dm.crop_size
        self.batch_size, self.max_corrupt = dm.batch_size, dm.max_corrupt
        self.header = _npy_header(self.shape)
        self.encoding = manifest_encoding(dm.manifest)
        self.keys = dm.index["key"].to_numpy(object)
        self.label = dm.index["label"].to_numpy(np.int64)
        self.plate = dm._plate_idx
        self.batch_shape = (self.batch_size, self.shape[0], self.crop, self.crop)
        self.ring: BatchRing | None = None  # set by the loader that runs this stream in workers

    def collate(self, items: list[tuple[int, np.ndarray]]) -> dict:
        """uint8 batch: each sample's crop view is copied once, straight into the batch.

        In a loader worker the batch goes into one of the worker's reused shared-memory buffers
        (:class:`BatchRing`), so nothing is copied again to send it. Normalization happens later, on
        the device (:class:`BatchFinisher`).
        """
        rows = np.fromiter((r for r, _ in items), dtype=np.int64, count=len(items))
        out, image = batch_buffer(self.ring, (len(items), self.shape[0], self.crop, self.crop))
        for i, (_, crop) in enumerate(items):
            out[i] = crop
        return {
            "image": image,
            "label": torch.from_numpy(self.label[rows]),
            "index": torch.from_numpy(rows),
            "plate": torch.from_numpy(self.plate[rows]),
        }


class TrainStream(IterableDataset):
    """Endless resampled shard stream of one rank; each worker yields its share of the epoch."""

    def __init__(self, dm, rows: np.ndarray, rank: int, world: int):
        self.s = _Samples(dm)
        idx = dm.index.iloc[rows]
        self.urls = sorted({os.path.join(self.s.shards_dir, n) for n in idx["shard"]})
        # per shard: this stage's rows in tar order (the select stage), with their byte ranges
        self.members = {}
        for name, g in idx.assign(row=rows).sort_values("npy_offset", kind="stable").groupby("shard", sort=False):
            self.members[os.path.join(self.s.shards_dir, name)] = (
                g["row"].tolist(),
                g["npy_offset"].astype(np.int64).tolist(),
                g["npy_size"].astype(np.int64).tolist(),
            )
        self.rank, self.seed, self.shuffle_buffer = rank, dm.seed, dm.shuffle_buffer
        self.augment_on_device = dm.augment_on_device
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
        members = ((u, *self.members[u]) for u in urls)
        samples = _shard_samples(members, errors, self.s.shape, self.s.header, self.s.encoding, self.s.keys)
        # crop before shuffling, as views: the buffer holds no pixel copies. Flips and rotations are drawn
        # here, and applied either to the whole batch on the device (BatchFinisher: the worker copies plain
        # rows) or here, as strided views copied into the batch (CPU-only training: in parallel workers)
        crops = ((row, *random_crop_view(img, self.s.crop, gen)) for row, img in samples)
        stream = wds.filters._shuffle(crops, self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)
        for _ in range(skip_mine * self.s.batch_size):  # resume: replay the stream up to the saved position
            next(stream)
        for _ in range(mine - skip_mine):
            items = [next(stream) for _ in range(self.s.batch_size)]
            if not self.augment_on_device:
                yield self.s.collate([(row, flip_rot90_view(crop, flip_rot)) for row, crop, flip_rot in items])
                continue
            batch = self.s.collate([(row, crop) for row, crop, _ in items])
            yield {**batch, "flip_rot": torch.tensor([flip_rot for *_, flip_rot in items], dtype=torch.uint8)}


class EvalStream(IterableDataset):
    """A rank's fixed batches of one stage, read by byte offset; worker w takes batches w, w+nw, ..."""

    def __init__(self, dm, rows: np.ndarray, rank: int, world: int):
        self.s = _Samples(dm)
        n = len(rows)
        block = rows[rank * n // world : (rank + 1) * n // world]
        nb = math.ceil(math.ceil(n / world) / dm.batch_size) if n else 0
        # same batch count on every rank (sizes differ by at most one), so per-step collectives line up
        self.batches = [b for b in np.array_split(block, nb)] if nb else []
        if any(len(b) == 0 for b in self.batches):
            log.warning(
                "rank %d has fewer samples (%d) than batches (%d): ranks get unequal batch counts", rank, len(block), nb
            )
            self.batches = [b for b in self.batches if len(b)]
        self.shard = dm.index["shard"].to_numpy(object)
        self.offset = dm.index["npy_offset"].to_numpy(np.int64)
        self.size = dm.index["npy_size"].to_numpy(np.int64)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info else (0, 1)
        errors, mapped = SkipCounter(self.s.max_corrupt), {}
        for batch in self.batches[worker::nw]:
            items = []
            for row in batch.tolist():
                try:
                    img = _decode(self._read(mapped, row), self.s.shape, self.s.header, self.s.encoding)
                except Exception as exn:  # noqa: BLE001 — skipped and counted
                    errors(_named(exn, self.shard[row], self.s.keys[row]))
                    continue
                items.append((row, center_crop(img, self.s.crop)))
            if items:
                yield self.s.collate(items)

    def _read(self, mapped: dict, row: int) -> memoryview:
        name = self.shard[row]
        if name not in mapped:
            if len(mapped) >= 8:  # batches are contiguous rows: a few shards at a time
                mapped.clear()  # a mapping closes when its last view is gone
            mapped[name] = _map(os.path.join(self.s.shards_dir, name))
        try:
            return _member_bytes(mapped[name], name, int(self.offset[row]), int(self.size[row]))
        except tarfile.ReadError as exn:
            raise OSError(f"{exn} (row {row})") from None


class _RingLoader:
    """A DataLoader over a stream, with a length, whose workers hand batches over through a
    :class:`BatchRing` (a plain iterable to Lightning, which therefore neither injects a sampler nor
    warns about sized IterableDatasets)."""

    def __init__(
        self,
        stream: "TrainStream | EvalStream",
        num_workers: int,
        persistent_workers: bool,
        pin_memory: bool,
        finish_batch: BatchFinisher,
    ):
        self.stream, self.finish_batch = stream, finish_batch  # uint8 batch → normalized (see CellDataModule)
        self.ring = BatchRing(num_workers, stream.s.batch_shape) if num_workers else None
        stream.s.ring = self.ring
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            worker_init_fn=_one_thread,
        )
        self._workers_started = False

    def __len__(self) -> int:
        return len(self.stream)

    def _batches(self):
        if self.ring is not None and not (self.loader.persistent_workers and self._workers_started):
            self.ring.restart()  # new worker processes are about to start
        self._workers_started = True
        try:
            for batch in self.loader:  # with pinned memory, the pin thread already took ring images
                if isinstance(batch["image"], RingImage):
                    batch["image"] = self.ring.take(batch["image"])
                yield batch
        finally:
            if self.ring is not None and not self.loader.persistent_workers:
                self.ring.forget()  # the workers are gone: their buffers live on only in batches still held


class EvalLoader(_RingLoader):
    """The validation/test/predict loader over :class:`EvalStream`."""

    def __init__(self, stream: EvalStream, num_workers: int, pin_memory: bool, finish_batch: BatchFinisher):
        super().__init__(stream, min(num_workers, len(stream)), False, pin_memory, finish_batch)

    def __iter__(self):
        return self._batches()


class TrainLoader(_RingLoader):
    """The training loader over :class:`TrainStream`, with an epoch counter and a resumable position
    (Lightning saves ``state_dict()`` in checkpoints).

    The position is the number of batches handed out. Lightning does not
    prefetch from a loader that has a length, so at a checkpoint taken after a
    training step that equals the steps done in this epoch.
    """

    def __init__(
        self,
        stream: TrainStream,
        num_workers: int,
        persistent_workers: bool,
        pin_memory: bool,
        finish_batch: BatchFinisher,
    ):
        super().__init__(stream, num_workers, persistent_workers, pin_memory, finish_batch)
        self.epoch, self.yielded, self._resume = -1, 0, None

    def __iter__(self):
        epoch, skip = self._resume if self._resume else (self.epoch + 1, 0)
        self._resume = None
        self.epoch, self.yielded = epoch, skip
        self.stream.state[0], self.stream.state[1] = epoch, skip
        for batch in self._batches():
            self.yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": max(self.epoch, 0), "batches": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        epoch, done = int(state["epoch"]), int(state["batches"])
        self._resume = (epoch + 1, 0) if done >= len(self) else (epoch, done)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers do small per-sample ops; avoid oversubscribing cores
