"""Hierarchical channel sampling (data.channel_sampling): subset sizes uniform in 1..C, never empty,
one subset per training batch, deterministic under the seed; evaluation batches keep every channel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.loading.transforms import batch_generator, draw_channel_subset
from cellrep.errors import CellrepError

SPLIT = {"name": "batch", "test_fraction": 0.21, "val_fraction": 0.2, "holdout": None, "shots": 0, "seed": 0}


def test_subset_sizes_are_uniform_and_never_empty():
    c, n = 6, 6000
    gen = torch.Generator().manual_seed(0)
    draws = [draw_channel_subset(c, gen) for _ in range(n)]
    sizes = np.array([len(d) for d in draws])
    assert sizes.min() >= 1 and sizes.max() <= c
    counts = np.bincount(sizes, minlength=c + 1)[1:]
    # uniform over 1..6: each size ~1000 (sd ~29); a per-channel coin would give sizes 1 and 6 ~94 each
    assert np.all(np.abs(counts - n / c) < 150), counts
    for d in draws[:200]:
        assert torch.equal(d, d.unique()) and d.dtype == torch.int64  # distinct, sorted
    # given its size the subset is uniform: every channel appears in (1+..+6)/6/6 = 7/12 of the draws
    inclusion = np.bincount(np.concatenate([d.numpy() for d in draws]), minlength=c) / n
    assert np.all(np.abs(inclusion - 7 / 12) < 0.04), inclusion


def test_subsets_are_deterministic_under_the_seed():
    index = torch.arange(10, 42)
    same = [draw_channel_subset(6, batch_generator(7, index)) for _ in range(2)]
    assert torch.equal(*same)
    other_seeds = {tuple(draw_channel_subset(6, batch_generator(s, index)).tolist()) for s in range(30)}
    other_batches = {tuple(draw_channel_subset(6, batch_generator(7, index + s)).tolist()) for s in range(30)}
    assert len(other_seeds) > 5 and len(other_batches) > 5


def _dm(shards, **kw):
    return CellDataModule(shards, split=SPLIT, batch_size=8, num_workers=0, crop_size=12, **kw)


def test_training_batches_carry_one_subset_and_eval_batches_all_channels(tiny_shards):
    dm = _dm(tiny_shards, channel_sampling=True, augment_on_device=False)
    full = _dm(tiny_shards, augment_on_device=False)  # same stream, no sampling
    sizes = set()
    for batch, ref in zip(dm.train_dataloader(), full.train_dataloader()):
        out, ref = dm.train_dataloader().finish_batch(batch), full.finish_batch(ref)
        ids = out["channel_ids"]
        assert len(ids) >= 1 and out["image"].shape[1] == len(ids)
        torch.testing.assert_close(out["image"], ref["image"][:, ids])  # each channel keeps its own statistics
        again = dm.train_dataloader().finish_batch(batch)  # the same batch draws the same subset
        assert torch.equal(again["channel_ids"], ids)
        sizes.add(len(ids))
    assert len(sizes) > 1
    for batch in dm.eval_dataloader("val"):
        out = dm.finish_batch(batch)
        assert "channel_ids" not in out and out["image"].shape[1] == dm.in_chans

    class Trainer:  # what on_after_batch_transfer asks Lightning's trainer
        training = True

    batch = next(iter(dm.eval_dataloader("val")))
    dm.trainer = Trainer()
    assert "channel_ids" in dm.on_after_batch_transfer(dict(batch), 0)  # a training step samples
    Trainer.training = False
    assert "channel_ids" not in dm.on_after_batch_transfer(dict(batch), 0)  # validation inside fit does not


def test_channel_sampling_needs_a_channel_agnostic_model(make_cfg):
    from cellrep.config import to_schema

    with pytest.raises(CellrepError, match="channel-agnostic") as err:
        to_schema(make_cfg("data.channel_sampling=true", "model=resnet18"))
    assert "ca_vit" in err.value.fix
    to_schema(make_cfg("data.channel_sampling=true", "model=ca_vit_s16"))  # accepted
