"""Knowledge-graph losses on a batch's perturbation means (docs/FEWSHOT.md).

Both losses see a batch of sample features ``x`` (B×D), their perturbation
labels ``y`` (B) and the dataset's perturbation graph ``W`` (P×P, symmetric,
zero diagonal, from :func:`cellrep.knowledge.graph.perturbation_graph`) with
``present`` (P, bool: the perturbation is a node of the graph).

Shared first step — the batch's perturbations ``u_1..u_n`` are the distinct
labels of the batch that are ``present``; ``m_i`` is the mean feature of the
batch's samples of ``u_i``, ``f_i = m_i / ‖m_i‖`` (L2-normalized), and
``A_ij = W[u_i, u_j]``. Perturbations absent from the graph take no part
(absence from a database is no evidence of non-interaction). ``R`` is the set
of i with at least one neighbour in the batch (``Σ_j A_ij > 0``).

``graph_contrastive`` — ``s_ij = f_i·f_j / τ`` for ``j ≠ i`` (the diagonal is
masked to −∞), ``p_ij = softmax_j(s_i)`` over the batch's other present
perturbations, and

    loss = (1/|R|) Σ_{i∈R} [ −Σ_j A_ij log p_ij / Σ_j A_ij ],

a cross-entropy between each anchor's neighbour distribution and its
similarity softmax (the weighted form of SupCon's per-anchor average), so the
value does not depend on the scale of the scores and rows without neighbours
in the batch are left out rather than counted as zero.

``laplacian`` — on the sub-graph of ``R``, with ``D = diag(Σ_j A_ij)`` and
``L_norm = I − D^{-1/2} A D^{-1/2}``:

    loss = trace(Fᵀ L_norm F) / |R| = (1/|R|) · ½ Σ_ij A_ij ‖f_i/√d_i − f_j/√d_j‖²,

where F stacks the ``f_i`` of R. Normalized features keep the loss from being
minimized by shrinking every feature toward zero.

Both return 0 (still attached to the graph of ``x``) when the batch has no
pair of connected perturbations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from cellrep.errors import CellrepError

GRAPH_LOSSES = ("none", "graph_contrastive", "laplacian")


class BatchGraph(NamedTuple):
    features: torch.Tensor  # n×D, L2-normalized perturbation means
    weights: torch.Tensor  # n×n, A
    labels: torch.Tensor  # n, the perturbations u_i


def batch_graph(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, present: torch.Tensor) -> BatchGraph:
    """Per-perturbation means of ``x`` (present perturbations only), normalized, and their adjacency."""
    keep = present[y]
    x, y = x[keep].float(), y[keep]
    labels, inverse = torch.unique(y, return_inverse=True)
    sums = torch.zeros(len(labels), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    counts = torch.bincount(inverse, minlength=len(labels)).clamp_min(1).to(x.dtype)
    means = sums / counts[:, None]
    a = weights[labels][:, labels].to(x.dtype)
    a = a * (1 - torch.eye(len(labels), dtype=x.dtype, device=x.device))
    return BatchGraph(F.normalize(means, dim=1, eps=1e-8), a, labels)


def graph_contrastive_loss(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, present: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Weighted contrastive loss toward graph neighbours; see the module docstring for the exact form."""
    f, a, _ = batch_graph(x, y, weights, present)
    degree = a.sum(1)
    anchors = degree > 0
    if not anchors.any():
        return x.sum() * 0.0
    sim = f @ f.T / temperature
    sim = sim.masked_fill(torch.eye(len(f), dtype=torch.bool, device=f.device), float("-inf"))
    log_p = torch.log_softmax(sim, dim=1)
    # -inf on the diagonal times A_ii = 0 must count as 0, not NaN
    per_anchor = -(a * log_p.masked_fill(a == 0, 0.0)).sum(1)[anchors] / degree[anchors]
    return per_anchor.mean()


def laplacian_loss(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """trace(Fᵀ L_norm F) / |R| on the batch's connected perturbations; see the module docstring."""
    f, a, _ = batch_graph(x, y, weights, present)
    degree = a.sum(1)
    anchors = degree > 0
    if not anchors.any():
        return x.sum() * 0.0
    f, a, degree = f[anchors], a[anchors][:, anchors], degree[anchors]
    inv_sqrt = degree.rsqrt()
    lap = torch.eye(len(f), dtype=f.dtype, device=f.device) - inv_sqrt[:, None] * a * inv_sqrt[None, :]
    return torch.trace(f.T @ lap @ f) / len(f)


def graph_loss(
    name: str, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, present: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """The loss named by ``task.graph_loss`` (``graph_contrastive`` or ``laplacian``)."""
    if name == "graph_contrastive":
        return graph_contrastive_loss(x, y, weights, present, temperature)
    if name == "laplacian":
        return laplacian_loss(x, y, weights, present)
    raise ValueError(f"unknown graph loss '{name}' (expected one of {GRAPH_LOSSES})")


def register_graph(module: torch.nn.Module, name: str, weights, present) -> None:
    """Attach the perturbation graph to a task as non-persistent buffers (they follow the device,
    stay out of checkpoints) when a graph loss is configured."""
    if name == "none":
        return
    if weights is None or present is None:
        raise CellrepError(
            f"task.graph_loss={name} needs the perturbation graph",
            fix="build the task through cellrep-train (task.graph_path)",
        )
    module.register_buffer("graph_weights", torch.as_tensor(weights, dtype=torch.float32), persistent=False)
    module.register_buffer("graph_present", torch.as_tensor(present, dtype=torch.bool), persistent=False)
