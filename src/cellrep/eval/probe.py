"""Linear probes on cached features: every block × several learning rates in one training loop.

docs/benchmarks.md "Per-block linear probing" (ViTally Consistent; the DINOv2
``eval/linear.py`` habit): a probe per block is a BatchNorm without affine
parameters (so blocks of very different scales are comparable) followed by a
linear layer; one linear layer per learning rate, all trained together on the
same minibatches of cached features, the learning rate chosen per block on
validation rows, then scored on held-out rows. No backbone is involved here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from cellrep.config import ProbeTrainingConfig
from cellrep.errors import CellrepError
from cellrep.eval.knn import knn_metrics

log = logging.getLogger(__name__)


@dataclass
class ProbeSettings(ProbeTrainingConfig):
    """The probes' schedule, with its defaults and checks from the config schema, plus the run's seed."""

    seed: int = 0


class LinearProbes(nn.Module):
    """Per block: BatchNorm1d(affine=False) → one Linear per learning rate.

    ``momentum=None`` makes the running statistics the plain average over all
    training batches, so evaluation normalizes with what training saw even
    after few steps.
    """

    def __init__(self, dims: list[int], num_classes: int, num_lrs: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm1d(d, affine=False, momentum=None) for d in dims)
        self.heads = nn.ModuleList(nn.ModuleList(nn.Linear(d, num_classes) for _ in range(num_lrs)) for d in dims)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per block: logits of every learning rate, (L, B, C)."""
        return [self.block_logits(b, x) for b, x in enumerate(xs)]

    def block_logits(self, b: int, x: torch.Tensor) -> torch.Tensor:
        z = self.norms[b](x)  # once per block: the heads share the normalization
        return torch.stack([head(z) for head in self.heads[b]])


@dataclass
class ProbeResult:
    table: pd.DataFrame  # one row per block
    best_block: str
    selected_on: str  # "val", or "train" when there are no validation rows
    test_logits: dict[str, np.ndarray] | None = None  # chosen head per block, on the test rows


def _hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Correct top-k predictions of every head: logits (L, N, C) → (L,) counts."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[None, :, None]).any(-1).sum(-1)


@torch.no_grad()
def _accuracy(model: LinearProbes, b: int, x: torch.Tensor, y: torch.Tensor, keep: bool, chunk: int = 8192):
    """(top-1, top-5) per head, and the logits when ``keep``; in chunks so (L, N, C) never sits in memory."""
    if len(y) == 0:
        nan = torch.full((len(model.heads[b]),), float("nan"))
        return nan, nan, None
    top1, top5, kept = 0, 0, []
    for start in range(0, len(y), chunk):
        out = model.block_logits(b, x[start : start + chunk])
        top1 = top1 + _hits(out, y[start : start + chunk], 1)
        top5 = top5 + _hits(out, y[start : start + chunk], 5)
        if keep:
            kept.append(out)
    return top1 / len(y), top5 / len(y), torch.cat(kept, dim=1) if keep else None


def train_probes(
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    stage: np.ndarray,
    num_classes: int,
    settings: ProbeSettings = ProbeSettings(),
    keep_logits: bool = False,
    progress: bool = True,
) -> ProbeResult:
    """Train a BatchNorm(affine=False) + linear probe per block and learning rate (docs/benchmarks.md).

    ``features``: block name → (N, D_b) array, rows aligned with ``labels``
    (int class ids) and ``stage`` ("train" / "val" / "test"). The learning rate
    is chosen per block on "val" rows; the best block is the one with the best
    validation accuracy (ties: mean validation accuracy over learning rates,
    then the deeper block), so held-out rows never choose anything. With
    ``settings.knn`` each block also gets ``knn_top1`` / ``knn_macro_f1``: 1-nearest-neighbour (cosine)
    classification of the held-out rows against the training rows (CHAMMI's protocol,
    :mod:`cellrep.eval.knn`); they choose nothing either.
    """
    stage = np.asarray(stage).astype(str)
    labels = np.asarray(labels, dtype=np.int64)
    names = list(features)
    for name in names:
        if len(features[name]) != len(labels):
            raise CellrepError(
                f"probe features of block {name} ({len(features[name])} rows) do not align with {len(labels)} labels",
                fix="pass one label per feature row",
            )
    masks = {s: torch.from_numpy(stage == s) for s in ("train", "val", "test")}
    if int(masks["train"].sum()) < 2 or int(masks["test"].sum()) == 0:
        raise CellrepError(
            f"linear probing needs training and held-out rows (train={int(masks['train'].sum())}, "
            f"test={int(masks['test'].sum())})",
            fix="use a split with train and test experiments",
        )
    selected_on = "val" if int(masks["val"].sum()) else "train"
    if selected_on == "train":
        log.warning("no validation rows: the probe learning rate is chosen on training accuracy")

    torch.manual_seed(settings.seed)
    xs = [torch.as_tensor(np.asarray(features[n]), dtype=torch.float32) for n in names]
    y = torch.from_numpy(labels.copy())
    model = LinearProbes([x.shape[1] for x in xs], num_classes, len(settings.lrs))
    groups = [
        {"params": [p for heads in model.heads for p in heads[i].parameters()], "lr": lr}
        for i, lr in enumerate(settings.lrs)
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    train_rows = torch.nonzero(masks["train"]).squeeze(1)
    steps_per_epoch = max(1, math.ceil(len(train_rows) / settings.batch_size))
    total = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    for _ in tqdm(
        range(settings.epochs),
        desc=f"probes ({len(names)} blocks × {len(settings.lrs)} lrs)",
        disable=not progress,
        leave=False,
    ):
        perm = train_rows[torch.randperm(len(train_rows), generator=generator)]
        for chunk in perm.split(settings.batch_size):
            if len(chunk) < 2:  # BatchNorm cannot normalize a single sample
                continue
            outs = model([x[chunk] for x in xs])
            target = y[chunk]
            loss = sum(F.cross_entropy(o.flatten(0, 1), target.repeat(o.shape[0])) for o in outs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()

    model.eval()
    rows, logits_out = [], {}
    for b, name in enumerate(names):
        acc = {s: _accuracy(model, b, xs[b][mask], y[mask], keep_logits and s == "test") for s, mask in masks.items()}
        best = int(torch.nan_to_num(acc[selected_on][0], nan=-1.0).argmax())
        rows.append(
            {
                "block": name,
                "block_index": b,
                "dim": int(xs[b].shape[1]),
                "best_lr": settings.lrs[best],
                "train_acc": float(acc["train"][0][best]),
                "val_acc": float(acc["val"][0][best]),
                "test_acc": float(acc["test"][0][best]),
                "test_acc_top5": float(acc["test"][1][best]),
                "val_acc_mean_over_lrs": float(torch.nanmean(acc["val"][0])),
                "acc_by_lr": {
                    f"{lr:g}": {"val": float(acc["val"][0][i]), "train": float(acc["train"][0][i])}
                    for i, lr in enumerate(settings.lrs)
                },
            }
        )
        if settings.knn:  # CHAMMI: each held-out row takes the label of its most cosine-similar training row
            knn = knn_metrics(np.asarray(features[name]), labels, stage, reference=("train",))
            rows[-1]["knn_top1"] = knn.get("knn_top1", float("nan"))
            rows[-1]["knn_macro_f1"] = knn.get("knn_macro_f1", float("nan"))
        if keep_logits:
            logits_out[name] = acc["test"][2][best].numpy()
    table = pd.DataFrame(rows)
    key = f"{selected_on}_acc"
    ranked = table.assign(_tie=table["val_acc_mean_over_lrs"].fillna(-1)).sort_values(
        [key, "_tie", "block_index"], ascending=False, kind="stable"
    )
    table["chance"] = 1.0 / max(1, len(np.unique(labels[stage == "test"])))
    return ProbeResult(table, str(ranked["block"].iloc[0]), selected_on, logits_out if keep_logits else None)
