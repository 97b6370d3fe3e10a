"""Handing loader batches from worker processes to the main process through reused shared memory.

torch's DataLoader sends each worker batch in a new shared-memory block; :class:`BatchRing` lets each
worker refill a few buffers instead (docs/PERFORMANCE.md, "Loader"). Used by the loaders of
:mod:`cellrep.data.loading.streams`.
"""

from __future__ import annotations

import math
import uuid
import weakref

import numpy as np
import torch
from torch.utils.data import get_worker_info

from cellrep.errors import CellrepError


def batch_buffer(ring: "BatchRing | None", shape: tuple) -> tuple[np.ndarray, "torch.Tensor | RingImage"]:
    """Where a batch image of ``shape`` is written, and what is sent as the batch's ``image``."""
    if get_worker_info() is None:  # in-process loading: nothing to send
        image = torch.empty(shape, dtype=torch.uint8)
        return image.numpy(), image
    if ring is not None:
        claimed = ring.claim(shape)
        if claimed is not None:
            return claimed
    image = _shared_uint8(shape)  # every buffer of this worker is still held: a fresh block, as torch's collate does
    return image.numpy(), image


def _shared_uint8(shape: tuple) -> torch.Tensor:
    """An uninitialized uint8 tensor in shared memory (sent to the main process without a copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)


_RINGS: "weakref.WeakValueDictionary[str, BatchRing]" = weakref.WeakValueDictionary()  # main process, by token


class RingImage:
    """A batch image left in a worker's :class:`BatchRing` buffer, as the worker sends it: turned into a
    tensor in the main process by :meth:`BatchRing.take`, called by the loader or, with pinned memory,
    by the DataLoader's pin-memory thread (which calls ``pin_memory()`` on whatever a batch holds)."""

    def __init__(self, token: str, generation: int, worker: int, slot: int, n: int, buffer=None):
        self.token, self.generation, self.worker, self.slot, self.n = token, generation, worker, slot, n
        self.buffer = buffer  # the buffer itself, the first time it is used: mapped once by the main process

    def pin_memory(self, device=None) -> torch.Tensor:
        return _RINGS[self.token].take(self, pin=True)


class BatchRing:
    """Shared-memory batch buffers that a loader's workers fill again and again.

    torch's DataLoader sends each worker batch to the main process in a new shared-memory block: the
    worker allocates it and faults in every page, the main process maps it, and both unmap it after
    the step (~13 ms per 12.6 MB batch, about half a worker's time; docs/PERFORMANCE.md). Here each
    worker keeps up to ``slots`` buffers of a full batch and sends a :class:`RingImage` (which buffer,
    how many rows) as the batch's ``image``; the buffer itself travels once, and the main process keeps
    its mapping.

    A buffer is written again only after the main process released it (``busy`` flags in shared
    memory, set by the worker, cleared by the main process): when the last tensor viewing that batch
    image is freed (views and slices included), or at once when :meth:`take` copied it into pinned
    memory. A worker whose buffers are all held (a consumer that keeps batches) sends a fresh block
    instead, so keeping batches is safe; it only costs the speed-up.

    Lifetime: :meth:`restart` before each start of fresh worker processes (new flags, new buffers);
    persistent workers keep theirs across epochs.
    """

    SLOTS = 4  # prefetch_factor (2) queued batches + the one being filled + one held by the consumer

    def __init__(self, num_workers: int, batch_shape: tuple, slots: int = SLOTS):
        self.num_workers, self.batch_shape, self.slots = num_workers, tuple(batch_shape), slots
        self.token, self.generation = uuid.uuid4().hex, 0
        _RINGS[self.token] = self
        self.restart()

    def restart(self) -> None:
        """(main process) Fresh flags and no mapped buffers, for new worker processes. Batches still
        held from before keep their own mappings and release into the old flags."""
        self.generation += 1
        self.busy = torch.zeros((self.num_workers, self.slots), dtype=torch.uint8).share_memory_()
        self._busy, self._mine, self._mapped = self.busy.numpy(), [], {}

    def forget(self) -> None:
        """(main process) Drop the mappings of buffers no worker will fill again (shared memory is freed
        once no batch views them)."""
        self._mapped = {}

    def __getstate__(self) -> dict:  # spawned workers: the shared flags only
        return {**self.__dict__, "_busy": None, "_mine": [], "_mapped": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._busy = self.busy.numpy()

    def claim(self, shape: tuple) -> tuple[np.ndarray, RingImage] | None:
        """(worker side) A free buffer for a batch of ``shape`` (its first ``shape[0]`` rows) and the
        image to send, or None when all of this worker's buffers are still held."""
        worker, n = get_worker_info().id, shape[0]
        busy = self._busy[worker]
        for slot, buf in enumerate(self._mine):
            if not busy[slot]:
                busy[slot] = 1
                return buf.numpy()[:n], RingImage(self.token, self.generation, worker, slot, n)
        if len(self._mine) == self.slots:
            return None
        buf = _shared_uint8(self.batch_shape)
        self._mine.append(buf)
        slot = len(self._mine) - 1
        busy[slot] = 1
        return buf.numpy()[:n], RingImage(self.token, self.generation, worker, slot, n, buf)

    def take(self, image: RingImage, pin: bool = False) -> torch.Tensor:
        """(main process) The batch image: a view of the ring buffer, or (``pin``) its pinned copy."""
        if image.generation != self.generation:  # only an abandoned iterator's pin thread can see one
            raise CellrepError(
                "a batch of a finished loader iteration arrived after a new one started",
                fix="iterate one loader pass at a time",
            )
        key = image.worker, image.slot
        if image.buffer is not None:
            self._mapped[key] = image.buffer.numpy()
        view = self._mapped[key][: image.n]
        if pin:
            pinned = torch.from_numpy(view).pin_memory()
            self._busy[key] = 0
            return pinned
        weakref.finalize(view, self._busy.__setitem__, key, 0)  # the last tensor sharing the view is gone
        return torch.from_numpy(view)
