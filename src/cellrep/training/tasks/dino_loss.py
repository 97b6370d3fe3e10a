"""The pieces of the DINO / DINOv2 objective, as plain functions plus one module of state (the centers).

* :func:`teacher_probs`: the teacher's target distribution, either centered (subtract an EMA of the
  teacher's mean logits, then a sharp softmax: DINO) or balanced by Sinkhorn-Knopp (every prototype
  gets an equal share of the batch: DINOv2's option, SwAV's algorithm).
* :func:`dino_loss`: cross-entropy of the student (temperature ``student_temp``) against the teacher,
  over every (student crop, teacher global crop) pair of different views, averaged over the pairs.
* :func:`ibot_loss`: the same cross-entropy on the patch tokens the student saw masked (iBOT), the
  teacher seeing them unmasked; each image's masked tokens average to one term.
* :func:`koleo`: the Kozachenko-Leonenko regularizer, ``-mean log(distance to nearest neighbour)`` of
  L2-normalized embeddings, which spreads the batch over the sphere.
* :func:`teacher_temperature`, :func:`teacher_momentum`: DINOv2's schedules (linear warm-up of the
  teacher temperature, cosine EMA momentum to 1).
* :func:`collapse_metrics` and :func:`collapse_reasons`: the two ways DINO collapses (one prototype
  for everything, or a uniform distribution for everything) seen in the teacher's entropies, and
  feature spread across the batch.

Under DDP the batch statistics (centers, Sinkhorn sums) are summed over ranks, so every rank holds
the same centers.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CENTERINGS = ("center", "sinkhorn")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(x)
    return x


def centered_softmax(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    return F.softmax((logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """``N × K`` logits → an assignment whose rows (samples) sum to 1 and whose columns (prototypes)
    each hold about N/K of the mass (exactly in the limit of many iterations)."""
    q = torch.exp((logits.float() - logits.float().max()) / temp)  # the shift cancels in the normalizations
    n = torch.tensor(float(q.shape[0]), device=q.device)
    n = _all_sum(n)
    k = q.shape[1]
    q = q / _all_sum(q.sum())
    for _ in range(iterations):
        q = q / _all_sum(q.sum(dim=0, keepdim=True)) / k  # each prototype: 1/K of the mass
        q = q / q.sum(dim=1, keepdim=True) / n  # each sample: 1/N of the mass
    return q * n


class DINOCenters(nn.Module):
    """EMA of the teacher's mean logits, for the class token (``center``) and iBOT's patch tokens (``patch_center``).

    Buffers, so they are checkpointed and a resumed run centers as the uninterrupted one would.
    """

    def __init__(self, out_dim: int, patch_out_dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, patch_out_dim))

    @torch.no_grad()
    def update(self, name: str, logits: torch.Tensor) -> None:
        """``center ← m·center + (1−m)·mean(logits)`` over the batch (all ranks)."""
        if logits.shape[0] == 0:
            return
        total = _all_sum(logits.float().sum(dim=0, keepdim=True))
        count = _all_sum(torch.tensor(float(logits.shape[0]), device=logits.device))
        old = getattr(self, name)
        old.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)


@torch.no_grad()
def teacher_probs(
    logits: torch.Tensor, centering: str, temp: float, centers: DINOCenters, name: str, update: bool
) -> torch.Tensor:
    """The teacher's targets for ``logits`` (``N × K``); ``update`` moves the EMA center (training only).

    The center used is the one from before this batch, as in DINO: the batch's own mean would make
    the target depend on the rest of the batch at once.
    """
    if centering == "sinkhorn":
        return sinkhorn_knopp(logits, temp)
    probs = centered_softmax(logits, getattr(centers, name), temp)
    if update:
        centers.update(name, logits)
    return probs


def cross_entropy(student_logits: torch.Tensor, target: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row ``-Σ_k target_k · log softmax(student / T_s)_k``."""
    return -(target * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


def dino_loss(
    student_global: torch.Tensor, student_local: torch.Tensor, teacher: torch.Tensor, student_temp: float
) -> dict[str, torch.Tensor]:
    """``student_global`` (G×B×K logits), ``student_local`` (L×B×K), ``teacher`` (G×B×K probabilities).

    A student global crop is compared with the other global crops' targets only (the same view
    would teach nothing), every local crop with every global one. ``loss`` is the mean over those
    G·(G−1) + L·G pairs; ``global`` and ``local`` are their sums over the same denominator, so
    ``loss = global + local``.
    """
    g, n_local = student_global.shape[0], student_local.shape[0]
    pairs = max(1, g * (g - 1) + n_local * g)
    glob = student_global.new_zeros(())
    for i in range(g):
        for j in range(g):
            if i != j:
                glob = glob + cross_entropy(student_global[i], teacher[j], student_temp).mean()
    loc = student_global.new_zeros(())
    for i in range(n_local):
        for j in range(g):
            loc = loc + cross_entropy(student_local[i], teacher[j], student_temp).mean()
    return {"loss": (glob + loc) / pairs, "global": glob / pairs, "local": loc / pairs}


def ibot_loss(
    student_masked: torch.Tensor, teacher_masked: torch.Tensor, mask: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """``student_masked`` / ``teacher_masked``: logits / targets of the masked tokens (M×K, in the order of
    ``mask.nonzero()``), ``mask`` the N_img × T token mask. Each masked image's tokens average to one term;
    images without masks count as zero, and the sum is divided by all N_img images (as DINOv2)."""
    if student_masked.shape[0] == 0:
        return student_masked.sum() * 0.0
    per_token = cross_entropy(student_masked, teacher_masked, student_temp)
    per_image_count = mask.sum(dim=1).clamp(min=1).float()
    weights = (1.0 / per_image_count)[mask.nonzero()[:, 0]]
    return (per_token * weights).sum() / mask.shape[0]


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_i log ‖x̂_i − x̂_nn(i)‖`` over L2-normalized rows ``x̂`` (nearest neighbour other than itself)."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    dots = x @ x.t()
    dots.fill_diagonal_(-2.0)  # never one's own neighbour (cosines are ≥ -1)
    nn_index = dots.argmax(dim=1)
    dist_nn = (x - x[nn_index]).norm(dim=-1)
    return -torch.log(dist_nn + eps).mean()


def teacher_temperature(progress: float, warmup_temp: float, temp: float, warmup_fraction: float) -> float:
    """Linear from ``warmup_temp`` to ``temp`` over the first ``warmup_fraction`` of training, then ``temp``."""
    if warmup_fraction <= 0 or progress >= warmup_fraction:
        return temp
    return warmup_temp + (temp - warmup_temp) * max(0.0, progress) / warmup_fraction


def teacher_momentum(progress: float, base: float, final: float = 1.0) -> float:
    """Cosine from ``base`` (progress 0) to ``final`` (progress 1)."""
    p = min(1.0, max(0.0, progress))
    return final - (final - base) * (math.cos(math.pi * p) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher ← momentum·teacher + (1−momentum)·student``, parameter by parameter (same structure)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameters")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


@torch.no_grad()
def spread(x: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std over the batch of the L2-normalized rows of ``x``, × √D: 1 for random
    directions, 0 when every image embeds alike (the collapse indicator of DINO and SimCLR)."""
    if x.shape[0] < 2:
        return x.new_ones(())
    f = F.normalize(x.float(), dim=-1)
    return f.std(dim=0).mean() * math.sqrt(f.shape[-1])


def collapse_metrics(
    probs: torch.Tensor, student_features: torch.Tensor, teacher_features: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Entropies of the teacher's targets as fractions of log K, and feature spread across the batch.

    * ``teacher_entropy_of_mean``: H(mean_i p_i)/log K, near 0 when every image goes to one prototype;
    * ``teacher_entropy_per_sample``: mean_i H(p_i)/log K, near 1 when every target is uniform;
      healthy training keeps the first well above the second (targets differ between images);
    * ``student_std`` / ``teacher_std``: per-dimension std over the batch of the L2-normalized
      embeddings, × √D, so 1 is the spread of random directions and 0 is every image alike.
    """
    k = probs.shape[-1]
    log_k = math.log(k) if k > 1 else 1.0
    p = probs.float().clamp_min(1e-12)
    mean = p.mean(dim=0)
    out = {
        "teacher_entropy_of_mean": -(mean * mean.log()).sum() / log_k,
        "teacher_entropy_per_sample": -(p * p.log()).sum(dim=-1).mean() / log_k,
    }
    out["student_std"], out["teacher_std"] = spread(student_features), spread(teacher_features)
    return out


def collapse_reasons(metrics: dict[str, torch.Tensor], threshold: float) -> list[str]:
    """What in ``collapse_metrics`` says the representation collapsed (empty: nothing)."""
    reasons = []
    gap = float(metrics["teacher_entropy_of_mean"] - metrics["teacher_entropy_per_sample"])
    if gap < threshold:
        kind = "one prototype" if float(metrics["teacher_entropy_of_mean"]) < 0.5 else "a uniform distribution"
        reasons.append(
            f"the teacher gives every image the same target ({kind}: entropy of the mean "
            f"{float(metrics['teacher_entropy_of_mean']):.3f} vs per sample "
            f"{float(metrics['teacher_entropy_per_sample']):.3f} of log K)"
        )
    for name in ("teacher_std", "student_std"):
        if float(metrics[name]) < threshold:
            reasons.append(
                f"{name.split('_')[0]} embeddings hardly differ between images (std·√D {float(metrics[name]):.4f})"
            )
    return reasons
