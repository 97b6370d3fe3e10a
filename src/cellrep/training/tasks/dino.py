"""DINOv2-style self-distillation (``task=dino``): a student learns to match an EMA teacher across views.

Each batch image becomes 2 global crops (random resized, at the input size) and ``local_crops``
smaller ones (:mod:`cellrep.training.tasks.dino_views`), made on the device. The teacher (an EMA
of the student, never backpropagated) sees the global crops; the student sees all of them, its
global crops with iBOT-masked patch tokens when ``ibot_weight > 0``. The losses are in
:mod:`cellrep.training.tasks.dino_loss`. Labels are ignored (except by the optional graph prior).

**The encoder** in checkpoints is the *teacher's* backbone, under ``teacher.backbone.``: DINO
evaluates the teacher, which is the smoother, better of the two. ``cellrep-probe``, ``cellrep-eval``
and ``task.init_from`` therefore read the teacher (``models/checkpoint.ENCODER_PREFIXES``), and
``probe_backbone()`` hands it to the per-block probes. ``task.init_from`` loads into the student
(``self.backbone``), and the teacher is copied from it when training starts.

**Local crops on ViTs**: timm's ViTs fix their position table to the input grid, so they are
built with ``dynamic_img_size=True``, which interpolates the table to a local crop's grid (as DINOv2
does); at the input size the table is used unchanged, so the weights are those of a plain ViT and a
checkpoint rebuilds from the run's ``model`` settings alone. A CA-ViT builds its sin-cos positions
from each batch's grid and takes any size divisible by its patch. Resizing local crops up to the
input size would also work, but costs a global crop's compute per local crop.

**Cell-type context** (``model.context_path``, docs/FEWSHOT.md): student and teacher both take
each image's projected cell-type vector as one more token after the class token, in every crop,
global and local (:func:`cellrep.models.context.context_tokens`); it is dropped after the blocks,
so the heads and the patch tokens are as without it. The projection is part of ``DINOModel``, so
the teacher's is the EMA of the student's like every other teacher weight (``teacher.context.`` in
checkpoints, next to the encoder it goes with). Sharing the student's projection instead would pair
the teacher's averaged backbone with a projection it was never averaged with, and would move the
targets at the student's pace, which is what the EMA teacher exists to avoid.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.models.vision_transformer import VisionTransformer

from cellrep.errors import CellrepError
from cellrep.knowledge.graph_loss import graph_loss, register_graph
from cellrep.models.backbone import build_backbone
from cellrep.models.context import CellTypeContext, context_tokens, token_context
from cellrep.models.dino_head import DINOHead
from cellrep.models.vit import patch_size_of
from cellrep.training.tasks import dino_loss as losses_
from cellrep.training.tasks.base import NonFiniteLossError, Task
from cellrep.training.tasks.dino_views import random_resized_crops, token_masks


def build_dino_backbone(model: dict[str, Any], in_chans: int) -> nn.Module:
    """The run's ViT or CA-ViT (``num_classes=0``), taking local crops too (module docstring)."""
    kwargs = dict(model.get("kwargs") or {})
    args = dict(
        in_chans=in_chans, num_classes=0, img_size=model.get("img_size"), drop_path_rate=model.get("drop_path_rate", 0)
    )
    with torch.device("meta"):  # structure only: is it a timm ViT with a fixed position grid?
        probe = build_backbone(model["name"], **args, **kwargs)
    if not (isinstance(probe, VisionTransformer) or getattr(probe, "channel_agnostic", False)):
        raise CellrepError(
            f"task=dino needs a ViT (class token and patch tokens); {model['name']} is not one",
            fix="use model=vit_s16, vit_b16, vit_l16, vit_l8, vit_g8 or a ca_vit_* model",
        )
    if isinstance(probe, VisionTransformer) and not probe.dynamic_img_size:
        kwargs["dynamic_img_size"] = True
    return build_backbone(model["name"], **args, **kwargs)


class DINOModel(nn.Module):
    """Backbone + DINO head (+ iBOT head) + the mask token (+ the context projection): what the student
    trains and the teacher averages."""

    def __init__(
        self,
        backbone: nn.Module,
        head: dict[str, int],
        ibot_separate_head: bool,
        context: Optional[CellTypeContext] = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.context = context
        dim = backbone.num_features
        self.dino_head = DINOHead(dim, **head)
        self.ibot_head = DINOHead(dim, **head) if ibot_separate_head else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))

    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    @contextmanager
    def _masked(self, mask: Optional[torch.Tensor]):
        """Replace the patch embeddings of masked tokens by the mask token, before positions are added."""
        if mask is None or not bool(mask.any()):
            yield
            return
        token = self.mask_token

        def hook(module, inputs, out):
            if out.ndim == 4 and getattr(self.backbone, "channel_agnostic", False):  # (B·C)×D×h×w conv output
                m = mask.reshape(out.shape[0], out.shape[2], out.shape[3])[:, None]
                return torch.where(m, token.to(out.dtype)[:, :, None, None], out)
            m = mask.reshape(out.shape[:-1])  # timm: B×h×w×D (dynamic size) or B×N×D
            return torch.where(m[..., None], token.to(out.dtype), out)

        handle = self.backbone.patch_embed.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def forward(
        self,
        images: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        project: Optional[torch.Tensor] = None,
        cell_types: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """``cls`` (class token after the final norm) and its head ``logits``; ``mask`` (B × tokens) hides
        patch tokens from the backbone, ``project`` (B × tokens) picks the patch tokens whose head logits
        come back as ``patch_logits``, ``cell_types`` (B) pick the context vectors (with a context).
        One call does it all, so under FSDP the unit gathers its weights once."""
        with self._masked(mask):
            tokens = context_tokens(self.backbone, images, self.context, cell_types)
        cls = tokens[:, 0]
        out = {"cls": cls, "logits": self.dino_head(cls)}
        if project is not None:
            out["patch_logits"] = self.patch_head()(tokens[:, self.num_prefix_tokens :][project])
        return out

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}


class DINOTask(Task):
    """DINO + KoLeo (+ iBOT) self-distillation of a ViT / CA-ViT; the teacher is the encoder (module docstring)."""

    def __init__(
        self,
        model: dict[str, Any],
        in_chans: int,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        out_dim: int = 4096,
        head_hidden_dim: int = 512,
        head_bottleneck_dim: int = 128,
        head_layers: int = 3,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        teacher_temp_warmup_fraction: float = 0.3,
        centering: str = "center",
        center_momentum: float = 0.9,
        momentum_teacher: float = 0.992,
        final_momentum_teacher: float = 1.0,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops: int = 4,
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crop_size: Optional[int] = None,
        koleo_weight: float = 0.1,
        ibot_weight: float = 0.0,
        ibot_mask_probability: float = 0.5,
        ibot_mask_ratio: tuple[float, float] = (0.1, 0.5),
        ibot_separate_head: bool = False,
        freeze_prototypes_fraction: float = 0.0,
        collapse_threshold: float = 0.01,
        compile: bool = False,
        graph_loss: str = "none",
        graph_weight: float = 0.0,
        graph_temperature: float = 0.1,
        graph_weights: Optional[torch.Tensor] = None,
        graph_present: Optional[torch.Tensor] = None,
        group_of_index: Optional[torch.Tensor] = None,
        context_table: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["graph_weights", "graph_present", "group_of_index", "context_table"])
        register_graph(self, graph_loss, graph_weights, graph_present)
        if centering not in losses_.CENTERINGS:
            raise CellrepError(f"unknown task.centering '{centering}'", fix=f"use one of {list(losses_.CENTERINGS)}")
        backbone = build_dino_backbone(model, in_chans)
        self.patch_size = patch_size_of(backbone)
        head = dict(
            out_dim=out_dim, hidden_dim=head_hidden_dim, bottleneck_dim=head_bottleneck_dim, nlayers=head_layers
        )
        context = token_context(context_table, backbone, "dino")
        self.student = DINOModel(backbone, head, ibot_separate_head, context)
        self.teacher = copy.deepcopy(self.student)  # the context projection too: the teacher averages it
        self.teacher.requires_grad_(False)
        self.centers = losses_.DINOCenters(out_dim, out_dim, center_momentum)
        self.register_groups(group_of_index)
        self._teacher_step = 0  # optimizer steps the teacher has followed
        self._warned_epoch = -1
        if compile:  # per block, in place: keys keep their names
            for block in [*self.student.backbone.blocks, *self.teacher.backbone.blocks]:
                block.compile()

    @property
    def backbone(self) -> nn.Module:
        """The student's backbone: where ``task.init_from`` loads (the teacher follows at the start)."""
        return self.student.backbone

    def probe_backbone(self) -> nn.Module:
        """The teacher's backbone, the encoder DINO evaluates (``callbacks.block_probes``)."""
        return self.teacher.backbone

    def probe_context(self) -> Optional[nn.Module]:
        """The teacher's cell-type context projection, the one that goes with :meth:`probe_backbone`."""
        return self.teacher.context

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no stochastic depth in the targets
        return self

    # -- schedules ------------------------------------------------------------------------------
    def _progress(self) -> float:
        trainer = self._trainer
        total = getattr(trainer, "estimated_stepping_batches", None) if trainer is not None else None
        if not total or total == float("inf"):
            return 0.0
        return min(1.0, self.global_step / max(1, int(total)))

    def teacher_temp_now(self) -> float:
        h = self.hparams
        return losses_.teacher_temperature(
            self._progress(), h.warmup_teacher_temp, h.teacher_temp, h.teacher_temp_warmup_fraction
        )

    def momentum_now(self) -> float:
        return losses_.teacher_momentum(
            self._progress(), self.hparams.momentum_teacher, self.hparams.final_momentum_teacher
        )

    # -- views and losses -----------------------------------------------------------------------
    def _local_size(self, size: int) -> int:
        if self.hparams.local_crop_size is not None:
            local = int(self.hparams.local_crop_size)
        else:  # half the input, on the patch grid (DINOv2: 96 of 224)
            local = max(self.patch_size, (size // 2) // self.patch_size * self.patch_size)
        if local % self.patch_size or local < self.patch_size:
            raise CellrepError(
                f"task.local_crop_size={local} is not a positive multiple of the patch size {self.patch_size}",
                fix=f"set task.local_crop_size to a multiple of {self.patch_size}, or null (half the crop)",
            )
        return local

    def forward(
        self,
        images: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        labels: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(losses, collapse metrics) of one batch. Training (no ``generator``) moves the centers.
        ``index``: the batch's rows of the DataModule index, whose cell types pick the context vectors."""
        h = self.hparams
        cell_types = self.cell_types_at(index, self.student.context)

        def crop_types(crops: int) -> Optional[torch.Tensor]:
            # crops are stacked crop-major (every image's first crop, then every image's second, ...)
            return None if cell_types is None else cell_types.repeat(crops)

        training = generator is None
        b, size = images.shape[0], images.shape[-1]
        glob = torch.cat([random_resized_crops(images, size, tuple(h.global_crops_scale), generator) for _ in range(2)])
        local = None
        if h.local_crops > 0:
            small = self._local_size(size)
            local = torch.cat(
                [
                    random_resized_crops(images, small, tuple(h.local_crops_scale), generator)
                    for _ in range(h.local_crops)
                ]
            )
        temp = self.teacher_temp_now()

        mask = None
        if h.ibot_weight > 0:
            grid = (size // self.patch_size) ** 2
            tokens = grid * (images.shape[1] if getattr(self.backbone, "channel_agnostic", False) else 1)
            mask = token_masks(2 * b, tokens, h.ibot_mask_probability, tuple(h.ibot_mask_ratio), glob.device, generator)
        with torch.no_grad():
            teacher = self.teacher(glob, project=mask, cell_types=crop_types(2))
            t_cls = teacher["cls"]
            t_probs = losses_.teacher_probs(teacher["logits"], h.centering, temp, self.centers, "center", training)
        student = self.student(glob, mask, project=mask, cell_types=crop_types(2))
        s_cls, s_logits = student["cls"], student["logits"]
        k = s_logits.shape[-1]
        if local is not None:
            s_local = self.student(local, cell_types=crop_types(h.local_crops))["logits"].view(-1, b, k)
        else:
            s_local = s_logits.new_zeros(0, b, k)
        out = losses_.dino_loss(s_logits.view(2, b, k), s_local, t_probs.view(2, b, k), h.student_temp)
        # every teacher crop enters the same number of pairs, so CE − mean teacher entropy is exactly the mean KL:
        # what the student has left to learn (the CE itself also moves with the teacher's sharpness)
        t_entropy = -(t_probs * t_probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
        out = {
            "loss": out["loss"],
            "dino_global": out["global"],
            "dino_local": out["local"],
            "kl": out["loss"] - t_entropy,
        }
        if h.koleo_weight > 0 and b > 1:
            # within each global crop only: two crops of one image are not neighbours to push apart
            per_crop = [losses_.koleo(c) for c in s_cls.view(2, b, -1)]
            out["koleo"] = sum(per_crop) / 2
            out["loss"] = out["loss"] + h.koleo_weight * sum(per_crop)  # DINOv2 sums the two crops' terms
        if mask is not None:
            with torch.no_grad():
                t_masked = losses_.teacher_probs(
                    teacher["patch_logits"], h.centering, temp, self.centers, "patch_center", training
                )
            out["ibot"] = losses_.ibot_loss(student["patch_logits"], t_masked, mask, h.student_temp)
            out["loss"] = out["loss"] + h.ibot_weight * out["ibot"]
        if labels is not None and h.graph_loss != "none":
            out["graph"] = graph_loss(
                h.graph_loss, s_cls[:b], labels, self.graph_weights, self.graph_present, h.graph_temperature
            )
            out["loss"] = out["loss"] + h.graph_weight * out["graph"]
        metrics = losses_.collapse_metrics(t_probs, s_cls.detach(), t_cls)
        metrics["teacher_temp"] = torch.tensor(temp)
        return out, metrics

    # -- Lightning hooks ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        h = self.hparams
        size = getattr(self.trainer.datamodule, "crop_size", None)
        params = sum(p.numel() for p in self.student.backbone.parameters())
        if size:
            local = f"{h.local_crops} local {self._local_size(size)}px" if h.local_crops else "no local crops"
            rank_zero_info(
                f"DINO: {h.in_chans} channels, 2 global crops {size}px + {local}, patch {self.patch_size}; "
                f"backbone {params / 1e6:.1f}M parameters, head {h.out_dim} prototypes; centering {h.centering}; "
                f"teacher temp {h.warmup_teacher_temp:g}→{h.teacher_temp:g}, momentum "
                f"{h.momentum_teacher:g}→{h.final_momentum_teacher:g}; KoLeo {h.koleo_weight:g}, iBOT {h.ibot_weight:g}"
            )

    def on_train_start(self) -> None:
        if self.global_step == 0:  # a fresh start (perhaps from task.init_from): teacher = student
            self.teacher.load_state_dict(self.student.state_dict())
        self._teacher_step = self.global_step

    def training_step(self, batch, batch_idx):
        out, metrics = self(batch["image"], labels=batch.get("label"), index=batch.get("index"))
        if not torch.isfinite(out["loss"]):
            raise NonFiniteLossError(
                f"DINO loss became {out['loss'].item()} at step {self.global_step}; the last good checkpoint is kept",
                fix="lower task.optimizer.base_lr, set trainer.gradient_clip_val=3.0 (DINOv2), or use precision=32-true",
            )
        n = batch["image"].shape[0]
        self._log("train", out, n)
        for name, value in metrics.items():
            self.log(f"collapse/{name}" if name != "teacher_temp" else "train/teacher_temp", value, batch_size=n)
        self.log("train/teacher_momentum", self.momentum_now(), batch_size=n)
        self._check_collapse(metrics)
        return out["loss"]

    def _check_collapse(self, metrics: dict[str, torch.Tensor]) -> None:
        # a random network's targets already look alike: judge only after the learning-rate warm-up
        if self._progress() < self.hparams.scheduler.get("warmup_fraction", 0.0):
            return
        reasons = losses_.collapse_reasons(metrics, self.hparams.collapse_threshold)
        if reasons and self._warned_epoch != self.current_epoch:  # at most once an epoch
            self._warned_epoch = self.current_epoch
            rank_zero_warn(
                f"DINO collapse at step {self.global_step}: "
                + "; ".join(reasons)
                + ". Try a lower task.optimizer.base_lr, task.teacher_temp closer to 0.04, "
                "task.centering=sinkhorn, or a higher task.koleo_weight"
            )

    def on_after_backward(self) -> None:
        # DINO keeps the prototypes still at first: moving them while the backbone is random destabilizes training
        if self._progress() < self.hparams.freeze_prototypes_fraction:
            for head in {id(m): m for m in (self.student.dino_head, self.student.patch_head())}.values():
                head.prototypes.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.global_step > self._teacher_step:  # an optimizer step happened (not mid-accumulation)
            losses_.ema_update(self.teacher, self.student, self.momentum_now())
            self._teacher_step = self.global_step

    def _fixed_views(self, batch_idx: int, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(batch_idx)

    def validation_step(self, batch, batch_idx):
        out, metrics = self(
            batch["image"], self._fixed_views(batch_idx, batch["image"].device), index=batch.get("index")
        )
        self._log(
            "val",
            {**out, **{f"collapse_{k}": v for k, v in metrics.items() if k != "teacher_temp"}},
            len(batch["image"]),
        )

    def test_step(self, batch, batch_idx):
        out, _ = self(batch["image"], self._fixed_views(batch_idx, batch["image"].device), index=batch.get("index"))
        self._log("test", out, len(batch["image"]))

    def _log(self, stage: str, values: dict[str, torch.Tensor], n: int) -> None:
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", sync_dist=stage != "train", batch_size=n)
