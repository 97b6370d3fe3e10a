"""Knowledge-graph losses, in two forms (docs/FEWSHOT.md, "Two forms of the graph losses").

Every loss sees a batch of sample features ``x`` (B×D), their perturbation
labels ``y`` (B) and the dataset's perturbation graph ``W`` (P×P, symmetric,
zero diagonal, weights in [0, 1], from
:func:`cellrep.knowledge.graph.perturbation_graph`) with ``present`` (P,
bool: the perturbation is a node of the graph; an absent one has a zero row).

**Ours: on perturbation means, normalized per row** (``graph_contrastive``,
``laplacian``).

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

**The authors' reference form: per sample** (``graph_contrastive_reference``,
``laplacian_reference``), as the knowledge-graph paper's public code computes
it when its self-supervised models pass the batch's per-sample interaction
matrix (docs/FEWSHOT.md; their code divides a matrix of raw STRING scores, > 1, by 1000, and ``W``
is already in [0, 1]). Every sample is a row, those of absent
perturbations included (their row of ``W`` is 0). ``f_b = x_b / ‖x_b‖`` per
sample and ``A_bc = W[y_b, y_c]`` for ``b ≠ c``, ``A_bb = 0`` (B×B). Two
samples of one perturbation are therefore *not* neighbours (``W[u, u] = 0``).

``graph_contrastive_reference`` — ``s_bc = f_b·f_c / τ`` with the diagonal
set to 0 (zeroed, not removed: each row's softmax still holds ``exp(0)`` for
the sample itself), and

    loss = −(1/B) Σ_b Σ_c A_bc log softmax_c(s_b),

with no division by a row's degree: a row weighs as much as its neighbours'
weights sum to, a row without neighbours adds 0 but still counts in the mean,
and samples of absent perturbations are negatives in the other rows.

``laplacian_reference`` — ``d_b = Σ_c A_bc``, ``L = I − D^{-1/2} A D^{-1/2}``
with ``D^{-1/2} = diag(1/√(d_b + 10⁻⁶))``, and

    loss = trace(Fᵀ L F) = Σ_b ‖f_b‖² − Σ_bc A_bc f_b·f_c / √((d_b + 10⁻⁶)(d_c + 10⁻⁶)),

not divided by anything: it grows with the batch, and each sample without a
neighbour adds the constant ``‖f_b‖² = 1`` (no gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from cellrep.errors import CellrepError

GRAPH_LOSSES = ("none", "graph_contrastive", "laplacian", "graph_contrastive_reference", "laplacian_reference")


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


def sample_graph(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference form's inputs: per-sample normalized features (B×D) and ``A = W[y][:, y]`` with a
    zero diagonal (B×B). An absent perturbation's samples keep their (zero) rows."""
    x = x.float()
    a = weights[y][:, y].to(x.dtype)
    a = a * (1 - torch.eye(len(y), dtype=x.dtype, device=x.device))
    return F.normalize(x, dim=1), a


def graph_contrastive_reference_loss(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """The authors' per-sample contrastive form; see the module docstring."""
    f, a = sample_graph(x, y, weights)
    # the self-similarity is zeroed, not masked out: each row's softmax keeps an exp(0) term for itself
    sim = (f @ f.T / temperature) * (1 - torch.eye(len(f), dtype=f.dtype, device=f.device))
    return -(a * torch.log_softmax(sim, dim=1)).sum(1).mean()


def laplacian_reference_loss(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The authors' per-sample trace(Fᵀ L F), not averaged; see the module docstring."""
    f, a = sample_graph(x, y, weights)
    inv_sqrt = (a.sum(1) + 1e-6).rsqrt()
    lap = torch.eye(len(f), dtype=f.dtype, device=f.device) - inv_sqrt[:, None] * a * inv_sqrt[None, :]
    return torch.trace(f.T @ lap @ f)


def graph_loss(
    name: str, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, present: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """The loss named by ``task.graph_loss`` (any of ``GRAPH_LOSSES`` but ``none``)."""
    if name == "graph_contrastive":
        return graph_contrastive_loss(x, y, weights, present, temperature)
    if name == "laplacian":
        return laplacian_loss(x, y, weights, present)
    if name == "graph_contrastive_reference":
        return graph_contrastive_reference_loss(x, y, weights, temperature)
    if name == "laplacian_reference":
        return laplacian_reference_loss(x, y, weights)
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
