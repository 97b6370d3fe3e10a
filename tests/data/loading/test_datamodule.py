"""CellDataModule: batches, normalization, exact evaluation, equal batches per rank, resume, DDP."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.loading.transforms import center_crop, normalize
from cellrep.data.shards.writer import load_manifest, plate_key
from cellrep.errors import CellrepError

SPLIT = {"name": "batch", "test_fraction": 0.21, "val_fraction": 0.2, "holdout": None, "shots": 0, "seed": 0}


def _dm(shards, **kw):
    args = dict(split=SPLIT, batch_size=4, num_workers=0, crop_size=12)
    return CellDataModule(shards, **(args | kw))


def _indices(batches):
    return np.concatenate([b["index"].numpy() for b in batches]) if batches else np.array([], dtype=np.int64)


def test_prepare_exposes_classes_channels_and_counts(tiny_shards):
    dm = _dm(tiny_shards)
    assert dm.class_names == ["EMPTY_control", "g0", "g1", "g2", "g3"] and dm.num_classes == 5
    assert dm.in_chans == 3 and dm.channel_names == ["ch0", "ch1", "ch2"]
    assert sum(dm.split_counts.values()) == len(dm.index) == 72 and min(dm.split_counts.values()) > 0
    assert (dm.index["label"] == dm.index["perturbation"].map(dm.class_names.index)).all()


def test_split_config_keys_are_checked(tiny_shards):
    dm = _dm(tiny_shards, split=SPLIT | {"name": "random"}, normalization="global")
    assert dm.normalization == "global" and dm.split["name"] == "random"
    with pytest.raises(CellrepError, match="split config needs 'name'"):
        _dm(tiny_shards, split={"name": "batch", "fraction": 0.3})


def test_train_batches(tiny_shards):
    dm = _dm(tiny_shards)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(dm.split_counts["train"] / 4)
    for b in batches:
        assert b["image"].shape == (4, 3, 12, 12) and b["image"].dtype == torch.uint8  # finished on the device
        assert dm.finish_batch(b)["image"].dtype == torch.float32
        assert b["label"].dtype == torch.int64 and b["index"].dtype == torch.int64
        assert torch.equal(b["plate"], torch.from_numpy(dm._plate_idx[b["index"].numpy()]))
        assert (dm.index["split"].to_numpy()[b["index"].numpy()] == "train").all()
        assert torch.equal(b["label"], torch.from_numpy(dm.index["label"].to_numpy()[b["index"].numpy()]))
    again = list(_dm(tiny_shards).train_dataloader())  # same seed → same stream
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again))
    second_epoch = list(loader)
    assert not np.array_equal(_indices(batches), _indices(second_epoch))


@pytest.mark.parametrize("mode", ["plate_controls", "self", "global"])
def test_eval_batches_are_normalized_center_crops(tiny_shards, tiny_source, mode):
    dm = _dm(tiny_shards, normalization=mode)
    manifest = load_manifest(tiny_shards)
    loader = dm.test_dataloader()
    batch = loader.finish_batch(next(iter(loader)))
    for img, row in zip(batch["image"], batch["index"].tolist()):
        meta = dm.index.iloc[row]
        raw = center_crop(torch.from_numpy(tiny_source.images[meta["site_id"]]), 12)
        stats = {
            "plate_controls": manifest["plate_stats"][plate_key(meta["experiment"], meta["plate"])],
            "global": manifest["global_stats"],
            "self": None,
        }[mode]
        torch.testing.assert_close(img, normalize(raw, mode, stats), rtol=0, atol=1e-6 if mode == "self" else 0)


@pytest.mark.parametrize("mode", ["plate_controls", "self", "global"])
def test_batched_finish_equals_the_per_sample_path(tiny_shards, mode):
    # before finish_batch, workers flipped/rotated and normalized each crop with its plate's manifest stats
    # (per sample); the batched, on-device path must give the same values, for training and eval crops alike
    dm = _dm(tiny_shards, normalization=mode, augment_on_device=True)
    manifest = load_manifest(tiny_shards)
    batches = list(dm.train_dataloader())[:3] + list(dm.eval_dataloader("all"))
    for i, batch in enumerate(batches):
        done = dm.finish_batch(batch)
        assert done["image"].dtype == torch.float32 and torch.equal(done["index"], batch["index"])
        assert ("flip_rot" in batch) == (i < 3) and "flip_rot" not in done
        flip_rot = batch.get("flip_rot", torch.zeros(len(batch["index"]), 3, dtype=torch.uint8))
        for crop, img, row, (flip_w, flip_h, k) in zip(
            batch["image"], done["image"], batch["index"].tolist(), flip_rot.tolist()
        ):
            crop = crop.flip(-1) if flip_w else crop  # training crops: the drawn flips and turns, per sample
            crop = torch.rot90(crop.flip(-2) if flip_h else crop, k, dims=(-2, -1))
            meta = dm.index.iloc[row]
            stats = {
                "plate_controls": manifest["plate_stats"][plate_key(meta["experiment"], meta["plate"])],
                "global": manifest["global_stats"],
                "self": None,
            }[mode]
            torch.testing.assert_close(img, normalize(crop, mode, stats), rtol=0, atol=1e-6 if mode == "self" else 0)
        assert dm.finish_batch(done) is done  # finishing twice changes nothing


@pytest.mark.parametrize("num_workers", [0, 1])
def test_flips_on_the_device_or_in_the_workers_give_the_same_finished_batches(tiny_shards, num_workers):
    on_device = list(_dm(tiny_shards, num_workers=num_workers, augment_on_device=True).train_dataloader())
    in_workers = list(_dm(tiny_shards, num_workers=num_workers, augment_on_device=False).train_dataloader())
    assert all("flip_rot" in b for b in on_device) and not any("flip_rot" in b for b in in_workers)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(on_device, in_workers))  # raw: not yet
    dm = _dm(tiny_shards)
    for a, b in zip(on_device, in_workers, strict=True):
        assert torch.equal(dm.finish_batch(a)["image"], dm.finish_batch(b)["image"])


def test_every_consumer_gets_the_same_normalized_batches(tiny_shards):
    # Lightning (on_after_batch_transfer), the loaders' finish_batch (features.py) and dm.finish_batch agree
    from cellrep.eval.features import extract_block_features
    from cellrep.models.backbone import build_backbone

    dm = _dm(tiny_shards)
    raw = list(dm.eval_dataloader("val"))
    by_hook = [dm.on_after_batch_transfer(b, 0) for b in raw]
    by_loader = [dm.val_dataloader().finish_batch(b) for b in raw]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(by_hook, by_loader))
    backbone = build_backbone("resnet18", in_chans=3)
    direct = extract_block_features(backbone, dm.eval_dataloader("val"), [1], progress=False)
    finished = extract_block_features(backbone, by_hook, [1], progress=False)
    np.testing.assert_array_equal(direct.features["layer1"], finished.features["layer1"])
    with pytest.raises(CellrepError, match="no finish_batch"):
        extract_block_features(backbone, raw, [1], progress=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_covers_each_sample_once_per_rank_split(tiny_shards, num_workers, monkeypatch):
    dm = _dm(tiny_shards, num_workers=num_workers, batch_size=3)
    for stage in ("val", "test", "all"):
        expected = np.flatnonzero((dm.index["split"] == stage).to_numpy()) if stage != "all" else np.arange(72)
        for world in (1, 3):
            seen, counts = [], set()
            for rank in range(world):
                monkeypatch.setattr(dm, "_dist", lambda r=rank, w=world: (r, w))
                batches = list(dm.eval_dataloader(stage))
                counts.add(len(batches))
                seen.append(_indices(batches))
            assert len(counts) == 1, f"{stage}: unequal batch counts per rank {counts}"
            assert sorted(np.concatenate(seen).tolist()) == expected.tolist()


def test_train_batch_count_is_equal_on_every_rank(tiny_shards, monkeypatch):
    dm = _dm(tiny_shards, num_workers=2)
    n = dm.split_counts["train"]
    for rank in range(3):
        monkeypatch.setattr(dm, "_dist", lambda r=rank: (r, 3))
        batches = list(dm.train_dataloader())
        assert len(batches) == math.ceil(n / (4 * 3))


def test_resume_replays_the_same_stream(tiny_shards):
    dm = _dm(tiny_shards, num_workers=2)
    full = dm.train_dataloader()
    list(full)  # epoch 0
    epoch1 = list(full)
    interrupted = dm.train_dataloader()
    list(interrupted)
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(epoch1) - 3
    assert all(
        torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"]) for a, b in zip(rest, epoch1[3:])
    )


def test_lightning_checkpoint_mid_epoch_resumes_the_data_stream(tiny_shards, tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self, save_at=None):
            super().__init__()
            self.lin, self.seen, self.save_at = torch.nn.Linear(3, 5), [], save_at

        def training_step(self, batch, i):
            assert batch["image"].dtype == torch.float32  # on_after_batch_transfer finished it
            self.seen.append((self.current_epoch, i, batch["index"].tolist()))
            return self.lin(batch["image"].mean((2, 3))).logsumexp(1).mean()

        def on_train_batch_end(self, outputs, batch, i):  # where ModelCheckpoint saves
            if (self.current_epoch, i) == self.save_at:
                self.trainer.save_checkpoint(tmp_path / "mid.ckpt")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(model, ckpt=None):
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, _dm(tiny_shards, num_workers=2), ckpt_path=ckpt)
        return model.seen

    full = fit(Recorder(save_at=(1, 2)))
    resumed = fit(Recorder(), ckpt=tmp_path / "mid.ckpt")
    n = math.ceil(_dm(tiny_shards).split_counts["train"] / 4)
    assert resumed == full[n + 3 :], "the resumed run continues with the batches the full run trained on"


def test_config_mismatches_stop_with_a_fix(tiny_shards, tmp_path):
    with pytest.raises(CellrepError, match="(?s)images have 3 channels.*expects 5.*in_chans"):
        _dm(tiny_shards, expected_channels=5)
    with pytest.raises(CellrepError, match="crop size 17"):
        _dm(tiny_shards, crop_size=17)
    with pytest.raises(CellrepError, match="label column 'gene'"):
        _dm(tiny_shards, label_column="gene")
    with pytest.raises(CellrepError, match="cellrep-shard"):
        _dm(tmp_path)


def test_corrupt_samples_are_skipped_and_counted(tiny_shards, tmp_path, caplog):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    dm = _dm(shards, max_corrupt=1)
    row = int(np.flatnonzero((dm.index["split"] == "test").to_numpy())[0])
    meta = dm.index.iloc[row]
    with open(shards / meta["shard"], "r+b") as f:  # garble the .npy header of one test sample
        f.seek(int(meta["npy_offset"]))
        f.write(b"garbage!" * 4)
    got = _indices(list(dm.test_dataloader()))
    assert sorted(got.tolist()) == [r for r in np.flatnonzero((dm.index["split"] == "test").to_numpy()) if r != row]
    assert "skipped unreadable" in caplog.text
    for name in set(dm.index.loc[dm.index["split"] == "train", "shard"]):
        with open(shards / name, "r+b") as f:
            f.truncate(700)  # truncated shards: beyond max_corrupt skips the loader stops
    with pytest.raises(CellrepError, match="more than 1 unreadable"):
        list(dm.train_dataloader())


DDP_SCRIPT = textwrap.dedent("""
    import cellrep  # noqa: F401  (before lightning imports torchvision)
    import datetime, faulthandler, json, sys
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    import torch
    from cellrep.data.loading.datamodule import CellDataModule

    shards, out = sys.argv[1], sys.argv[2]

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 5)
            self.train_batches, self.val_index, self.test_index = 0, [], []

        def training_step(self, batch, i):
            self.train_batches += 1
            return torch.nn.functional.cross_entropy(self.lin(batch["image"].mean((2, 3))), batch["label"])

        def validation_step(self, batch, i):
            self.val_index += batch["index"].tolist()

        def test_step(self, batch, i):
            self.test_index += batch["index"].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(150, exit=True)  # a hang prints every thread's stack, then exits
    split = dict(name="batch", test_fraction=0.21, val_fraction=0.3, holdout=None, shots=0, seed=0)
    dm = CellDataModule(shards, split, batch_size=4, num_workers=0, crop_size=12)
    model = Recorder()
    # a rank that dies must fail its peer within a minute, not after the 30-minute default
    strategy = DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=60))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"train_batches": model.train_batches, "val": model.val_index, "test": model.test_index,
                   "counts": dm.split_counts, "val_rows": dm._stage_rows["val"].tolist(),
                   "test_rows": dm._stage_rows["test"].tolist()}, f)
""")


def test_ddp_two_processes_equal_batches_exact_eval(tiny_shards, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    log = tmp_path / "ddp.log"
    with open(log, "w") as out:  # a file, not a pipe: rank 1 inherits it and cannot keep a pipe open forever
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tiny_shards), str(tmp_path)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = "timeout"
    assert rc == 0, f"rc={rc}\n" + log.read_text()[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    n_train = ranks[0]["counts"]["train"]
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] == math.ceil(n_train / (4 * 2))
    for stage in ("val", "test"):
        seen = ranks[0][stage] + ranks[1][stage]
        assert ranks[0][stage] and ranks[1][stage], f"both ranks evaluate {stage}"
        assert sorted(seen) == sorted(ranks[0][f"{stage}_rows"]), f"{stage}: each sample exactly once"


def test_shard_samples_are_views_in_tar_order_and_bad_ones_are_counted(tiny_shards, tmp_path):
    # the train stream's reader: byte ranges from the index, sliced from a mapped shard (docs/PERFORMANCE.md)
    from cellrep.data.loading.streams import SkipCounter, _npy_header, _shard_samples
    from cellrep.data.shards.writer import read_index

    index = read_index(tiny_shards)
    name = index["shard"].iloc[0]
    rows = index[index["shard"] == name]
    shape, header = (3, 16, 16), _npy_header((3, 16, 16))
    job = (rows.index.tolist(), rows["npy_offset"].tolist(), rows["npy_size"].tolist())
    got = list(_shard_samples([(str(tiny_shards / name), *job)], SkipCounter(0), shape, header))
    assert [r for r, _ in got] == rows.index.tolist()
    with open(tiny_shards / name, "rb") as f:
        for (_, img), off, size in zip(got, rows["npy_offset"], rows["npy_size"]):
            f.seek(int(off))
            data = f.read(int(size))
            assert data[: len(header)] == header  # the writer's header: the zero-copy path is the one taken
            assert not img.flags.owndata and np.array_equal(img, np.load(io.BytesIO(data)))
    cut = tmp_path / name  # truncated inside the second sample; then a missing shard
    cut.write_bytes((tiny_shards / name).read_bytes()[: int(rows["npy_offset"].iloc[1]) + 100])
    counter = SkipCounter(5)
    again = list(_shard_samples([(str(cut), *job), (str(tmp_path / "missing.tar"), *job)], counter, shape, header))
    assert [r for r, _ in again] == rows.index.tolist()[:1] and counter.count == 2
    garbled = tmp_path / f"g{name}"
    data = bytearray((tiny_shards / name).read_bytes())
    data[int(rows["npy_offset"].iloc[0]) : int(rows["npy_offset"].iloc[0]) + 8] = b"garbage!"
    garbled.write_bytes(bytes(data))
    counter = SkipCounter(5)
    again = list(_shard_samples([(str(garbled), *job)], counter, shape, header))
    assert [r for r, _ in again] == rows.index.tolist()[1:] and counter.count == 1


def test_worker_batches_arrive_from_shared_memory_as_in_process(tiny_shards):
    dm = _dm(tiny_shards, num_workers=1)
    ref = _dm(tiny_shards, num_workers=0)
    for a, b in zip(dm.train_dataloader(), ref.train_dataloader()):
        assert a["image"].dtype == torch.uint8 and torch.equal(a["image"], b["image"])
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["plate"], b["plate"])
        torch.testing.assert_close(dm.finish_batch(a)["image"], ref.finish_batch(b)["image"], rtol=0, atol=0)


def test_with_train_rows_trains_on_exactly_those_rows_and_keeps_eval(tiny_shards):
    dm = _dm(tiny_shards)
    rows = dm._stage_rows["train"][::2]
    view = dm.with_train_rows(rows)
    seen = _indices(list(view.train_dataloader()))
    assert set(seen.tolist()) <= set(rows.tolist()) and len(seen) >= len(rows)
    assert np.array_equal(_indices(list(view.val_dataloader())), _indices(list(dm.val_dataloader())))
    assert len(dm.train_dataloader().stream) > len(view.train_dataloader().stream)  # the original is untouched
    with pytest.raises(CellrepError, match="no sites"):
        dm.with_train_rows(np.array([], dtype=np.int64))
