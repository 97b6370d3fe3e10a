"""BatchRing: worker batches reach the main process through reused shared buffers, never overwritten
while anything still views them."""

from __future__ import annotations

import gc

import pytest
import torch

from cellrep.data.loading.batch_ring import BatchRing
from cellrep.data.loading.datamodule import CellDataModule

SPLIT = {"name": "random", "test_fraction": 0.3, "val_fraction": 0.0, "holdout": None, "shots": 0, "seed": 0}


def _dm(shards, **kw):
    return CellDataModule(shards, **(dict(split=SPLIT, batch_size=4, num_workers=0, crop_size=12) | kw))


def _reference(shards, epochs=1, stage="train", **kw):
    dm = _dm(shards, **kw)
    loader = dm.train_dataloader() if stage == "train" else dm.eval_dataloader(stage)
    return [[{k: v.clone() for k, v in b.items()} for b in loader] for _ in range(epochs)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_worker_reuses_at_most_slots_buffers_and_batches_equal_in_process(tiny_shards):
    ref = _reference(tiny_shards)[0]
    loader = _dm(tiny_shards, num_workers=1).train_dataloader()
    got = 0
    for batch, want in zip(loader, ref, strict=True):
        assert _same(batch, want)
        got += 1
        del batch
        if got == len(ref) - 1:
            assert 0 < len(loader.ring._mapped) <= BatchRing.SLOTS
    assert got == len(ref) > 2 * BatchRing.SLOTS  # more batches than buffers: buffers were reused
    gc.collect()
    assert not loader.ring.busy.any()  # every buffer released once its batches are gone
    assert loader.ring._mapped == {}  # and, the pass over, no longer mapped by the loader


def test_kept_batches_and_kept_slices_are_never_overwritten(tiny_shards):
    ref = _reference(tiny_shards)[0]
    loader = _dm(tiny_shards, num_workers=1).train_dataloader()
    kept, slices = [], []
    for i, batch in enumerate(loader):
        if i % 2:
            kept.append((i, batch))  # the whole batch held
        else:
            slices.append((i, batch["image"][1:3]))  # only a view of part of the image held
    assert len(kept) + len(slices) == len(ref)
    for i, batch in kept:
        assert _same(batch, ref[i])
    for i, part in slices:
        assert torch.equal(part, ref[i]["image"][1:3])


def test_persistent_workers_keep_their_buffers_across_epochs(tiny_shards):
    ref = _reference(tiny_shards, epochs=2)
    loader = _dm(tiny_shards, num_workers=1, persistent_workers=True).train_dataloader()
    for epoch in range(2):
        got = list(loader)  # all held: past SLOTS batches, fresh blocks
        assert len(got) == len(ref[epoch]) and all(_same(a, b) for a, b in zip(got, ref[epoch]))
        if epoch == 0:
            buffers = dict(loader.ring._mapped)
        del got
    assert 0 < len(buffers) <= BatchRing.SLOTS and buffers.keys() == loader.ring._mapped.keys()
    assert all(loader.ring._mapped[k] is buf for k, buf in buffers.items())  # the same mappings


@pytest.mark.parametrize("stage", ["test", "all"])
def test_eval_batches_through_the_ring_equal_in_process_including_short_batches(tiny_shards, stage):
    ref = _reference(tiny_shards, stage=stage, batch_size=5)[0]
    assert min(len(b["index"]) for b in ref) < 5 and len(ref) > 2  # short batches use the front of a buffer
    loader = _dm(tiny_shards, num_workers=2, batch_size=5).eval_dataloader(stage)
    got = [{k: v.clone() for k, v in b.items()} for b in loader]
    assert len(got) == len(ref) and all(_same(a, b) for a, b in zip(got, ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinned_batches_are_taken_by_the_pin_thread_and_release_their_buffer_at_once(tiny_shards):
    ref = _reference(tiny_shards)[0]
    loader = _dm(tiny_shards, num_workers=1, pin_memory=True).train_dataloader()
    got = list(loader)  # all held, yet every buffer is free again: the batches are pinned copies
    assert all(b["image"].is_pinned() for b in got) and all(_same(a, b) for a, b in zip(got, ref, strict=True))
    assert 0 < len(loader.ring._mapped) <= BatchRing.SLOTS and not loader.ring.busy.any()
