"""SimCLR's objective (Chen et al. 2020): NT-Xent over the batch's 2N views, and the projector it is taken on.

* :func:`nt_xent`: the normalized temperature-scaled cross-entropy. The projections ``z`` are
  L2-normalized; for each view ``i`` of the 2N, ``s_ij = z_i·z_j / τ`` over every other view ``j``
  (itself excluded), and the loss is ``-log softmax_j(s_i)`` at ``j`` = the other view of the same
  site, averaged over the 2N anchors. Every other view in the batch is a negative.
* **Distributed** (DDP, FSDP): the views of every rank are gathered with
  ``torch.distributed.nn.functional.all_gather``, which passes gradients back to the rank that made
  them, so each rank's anchors see the global batch's 2·N·world views as candidates, as in SimCLR.
  The loss is the mean over a rank's own anchors; averaging the ranks' gradients (what DDP does)
  makes it the mean over all 2·N·world anchors. The projector's BatchNorm keeps per-rank batch
  statistics: SimCLR syncs them across devices, since a rank's statistics can tell its own views
  from the others'; cellrep's trainer has no ``sync_batchnorm`` setting today.
* :class:`Projector`: ``Linear → BatchNorm → GELU → Linear``, between the pooled backbone features
  and the loss; the encoder kept for evaluation is the backbone before it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    """``in_dim → hidden_dim`` (BatchNorm, GELU) ``→ out_dim``: SimCLR v2's projection head at two layers."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _gathered(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's ``z`` stacked in rank order, this rank's offset in it); gradients flow back.

    Ranks may hold different numbers of rows (an evaluation's batches differ by one site), so the
    row counts are exchanged first and every rank's rows are padded to the largest for the gather.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    counts = [torch.zeros(1, dtype=torch.long, device=z.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([z.shape[0]], device=z.device))
    counts = [int(c) for c in counts]
    padded = F.pad(z, (0, 0, 0, max(counts) - z.shape[0]))
    parts = all_gather(padded.contiguous())
    return torch.cat([part[:c] for part, c in zip(parts, counts)]), sum(counts[: dist.get_rank()])


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> dict[str, torch.Tensor]:
    """NT-Xent of ``z1`` and ``z2`` (N×D each: row ``i`` of both is one site's two views); module docstring.

    Returns ``loss`` and ``accuracy``: the share of anchors whose most similar other view is their
    positive (no gradient), which says how far the task is from solved better than the loss does.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # 2N local views: view 1 of every site, then view 2
    candidates, offset = _gathered(z)
    logits = z @ candidates.T / temperature
    local = torch.arange(2 * n, device=z.device)
    logits[local, offset + local] = float("-inf")  # a view is not its own positive nor a negative
    positive = offset + (local + n) % (2 * n)
    loss = F.cross_entropy(logits, positive)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == positive).float().mean()
    return {"loss": loss, "accuracy": accuracy}
