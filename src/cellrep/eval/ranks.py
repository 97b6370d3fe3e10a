"""Per-block features from many processes: ``cellrep-probe`` / ``cellrep-eval`` with ``trainer=ddp``.

    cellrep-eval ckpt_path=... trainer=ddp trainer.devices=8 trainer.num_nodes=2 run_name=embed1

Lightning's ``Trainer.predict`` runs the backbone under the configured strategy: each rank embeds
its share of the sites (the exact rank-partitioned evaluation stream of the DataModule) and
writes every batch as its own part, ``features.parts/rows-<first>-<last>-<n>.npz``, atomically.
Rank 0 then merges the parts in row order and the run goes on there alone (probes, corrections,
benchmarks); the other ranks stop. Parts are named by the rows they hold, not by a rank, so a
killed run re-run with the same command (``run_name=`` keeps the directory) embeds only the rows
no part holds yet, at any world size. ``features.parts/parts.json`` records what was embedded
(checkpoint, blocks, rows, whether the cell-type context conditioned them); parts of anything else in
the directory are an error, never mixed in.
The merged features equal a one-process run's (tests/eval/test_ranks.py).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from cellrep.errors import CellrepError
from cellrep.eval.features import BlockFeatures, SiteContext, block_names, pooled_block_features
from cellrep.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

PARTS = "features.parts"


class _BlockFeatureModule(L.LightningModule):
    def __init__(self, backbone, blocks: list[int] | None, context: SiteContext | None = None):
        super().__init__()
        self.backbone, self.blocks, self.site_context = backbone, blocks, context
        # a submodule, so the strategy moves it to each rank's device with the backbone
        self.context = None if context is None or not context.conditions_blocks else context.module

    def predict_step(self, batch, batch_idx):
        ids = None if self.context is None else self.site_context.cell_types(batch["index"], batch["image"].device)
        feats = pooled_block_features(self.backbone, batch["image"], self.blocks, self.context, ids)
        return {"rows": batch["index"].cpu().numpy(), "features": [f.float().cpu().numpy() for f in feats]}


class _RowsData(L.LightningDataModule):
    """The DataModule's evaluation stream over the rows still to embed, split over the ranks."""

    def __init__(self, dm, rows: np.ndarray):
        super().__init__()
        self.dm, self.rows = dm, rows

    def predict_dataloader(self):
        return self.dm.eval_dataloader("all", rows=self.rows)  # rank and world from the process group

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.dm.finish_batch(batch)  # uint8 → normalized, on the device


class _PartWriter(BasePredictionWriter):
    def __init__(self, parts_dir: Path, names: list[str]):
        super().__init__(write_interval="batch")
        self.parts_dir, self.names = parts_dir, names

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        rows = prediction["rows"]
        buf = io.BytesIO()
        np.savez(buf, rows=rows, **dict(zip(self.names, prediction["features"])))
        atomic_write_bytes(self.parts_dir / f"rows-{rows.min()}-{rows.max()}-{len(rows)}.npz", buf.getvalue())


def _check_record(parts_dir: Path, record: dict[str, Any]) -> None:
    path = parts_dir / "parts.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            diff = sorted(k for k in record if old.get(k) != record[k])
            raise CellrepError(
                f"{parts_dir} holds features of another embedding (differs in {', '.join(diff)})",
                fix="re-run with the same checkpoint, data and blocks, or use another run_name",
            )
    else:
        atomic_write_json(path, record)


def _done_rows(parts_dir: Path) -> np.ndarray:
    done = [np.load(p, allow_pickle=False)["rows"] for p in sorted(parts_dir.glob("rows-*.npz"))]
    return np.concatenate(done) if done else np.zeros(0, np.int64)


def _merge(parts_dir: Path, names: list[str], expected: np.ndarray) -> BlockFeatures:
    rows, chunks = [], {n: [] for n in names}
    for path in sorted(parts_dir.glob("rows-*.npz")):
        with np.load(path, allow_pickle=False) as part:
            rows.append(part["rows"])
            for n in names:
                chunks[n].append(part[n])
    rows = np.concatenate(rows)
    order = np.argsort(rows, kind="stable")
    if not np.array_equal(rows[order], np.sort(expected)):
        missing, extra = np.setdiff1d(expected, rows), np.setdiff1d(rows, expected)
        twice = len(rows) - len(np.unique(rows))
        raise CellrepError(
            f"the feature parts in {parts_dir} do not cover the sites exactly: {len(missing)} missing, "
            f"{len(extra)} unexpected, {twice} embedded twice",
            fix=f"delete {parts_dir} and re-run (it embeds everything again)",
        )
    return BlockFeatures(rows[order], {n: np.concatenate(chunks[n])[order] for n in names})


def features_across_ranks(
    backbone,
    dm,
    blocks: list[int] | None,
    trainer: dict[str, Any],
    run_dir: Path,
    source: str,
    progress: bool,
    context: SiteContext | None = None,
) -> BlockFeatures:
    """Every site's pooled features of ``blocks`` (None: all), embedded by the ranks of ``trainer``.

    Returns on rank 0 only; other ranks exit once their parts are written. ``source`` names what is
    embedded (the checkpoint) for the parts record; ``context``: the model's cell-type context
    (:func:`cellrep.eval.features.extract_block_features`).
    """
    names = block_names(backbone)
    wanted = list(range(len(names))) if blocks is None else sorted({int(b) for b in blocks})
    wanted_names = [names[k] for k in wanted]
    expected = np.arange(len(dm.index))  # the "all" stage
    parts_dir = Path(run_dir) / PARTS
    parts_dir.mkdir(parents=True, exist_ok=True)
    record = {"source": source, "blocks": wanted_names, "sites": int(len(expected)), "crop": int(dm.crop_size)}
    if context is not None and context.conditions_blocks:  # only then: parts of runs without one stay valid
        record["context"] = context.module.mode
    _check_record(parts_dir, record)
    todo = np.setdiff1d(expected, _done_rows(parts_dir))
    log.info(
        "features: %d of %d sites to embed (%d in earlier parts)", len(todo), len(expected), len(expected) - len(todo)
    )
    if len(todo):
        args = {**trainer, "logger": False, "enable_checkpointing": False, "enable_progress_bar": progress}
        runner = L.Trainer(**args, callbacks=[_PartWriter(parts_dir, wanted_names)])
        with warnings.catch_warnings():  # parts are named by their rows, not by Lightning's batch indices
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
            runner.predict(
                _BlockFeatureModule(backbone, None if blocks is None else wanted, context),
                datamodule=_RowsData(dm, todo),
                return_predictions=False,
            )
        runner.strategy.barrier()  # every rank's parts are on disk before rank 0 reads them
        if runner.global_rank != 0:
            raise SystemExit(0)  # this rank's share is written; probes and benchmarks are rank 0's
    return _merge(parts_dir, wanted_names, expected)
