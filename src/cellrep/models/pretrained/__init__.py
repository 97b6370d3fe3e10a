"""Published encoders from local files: timm weights, the OpenPhenom release, DINOv2 checkpoints.

``cellrep-probe encoder=PATH`` / ``cellrep-eval encoder=PATH`` embed with one as a
baseline, ``task.init_from=PATH`` starts training from one. Nothing is downloaded.
Each format is one row of :data:`FORMATS` (detector, model it needs, key mapping);
the first row whose detector accepts the file wins:

* ``cellrep``: a cellrep-train checkpoint (read by :mod:`cellrep.models.checkpoint`);
* ``openphenom``: Recursion's channel-agnostic MAE ViT-S/16 release (a directory with
  ``config.json`` + ``model.safetensors``; recursionpharma/maes_microscopy), mapped onto
  cellrep's CA-ViT (``block=parallel``, see :func:`cellrep.models.pretrained.openphenom.openphenom_weights`);
* ``dinov2``: facebookresearch/dinov2 key layout, converted by timm's own
  ``vision_transformer.checkpoint_filter_fn`` (``_convert_dinov2``) onto a timm ViT;
* ``timm``: any timm model's ``state_dict()``.

Files are read as safetensors or with ``torch.load(weights_only=True)``: a pickle
holding code is refused, never run. Keys and shapes are checked exactly (a half-loaded
encoder is an error naming the keys); the only deliberate changes are listed in the
returned ``notes`` (a dropped classifier head, an adapted first convolution, a resampled
position table).
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import logging
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from cellrep.errors import CellrepError
from cellrep.models.backbone import build_backbone
from cellrep.models.checkpoint import classifier_keys, fit_problems, load_backbone, load_encoder
from cellrep.models.pretrained.files import Format, Request, Source, read_source
from cellrep.models.pretrained.openphenom import is_openphenom, openphenom_model, openphenom_weights
from cellrep.models.pretrained.timm_weights import (
    CHANNEL_ADAPTATIONS,
    dinov2_model,
    is_dinov2,
    is_timm,
    timm_model,
    timm_weights,
)

__all__ = ["CHANNEL_ADAPTATIONS", "FORMATS", "init_backbone", "load_published_encoder", "published_normalization"]
log = logging.getLogger(__name__)


def _is_cellrep(src: Source) -> bool:
    return isinstance(src.raw, dict) and "hyper_parameters" in src.raw and "state_dict" in src.raw


# name → (detector, model it needs, mapping); the first detector that accepts the file wins
FORMATS: dict[str, Format] = {
    "cellrep": Format(_is_cellrep, lambda s, r: {}, lambda s, m, r: {}),  # models/checkpoint.py reads it
    "openphenom": Format(is_openphenom, openphenom_model, openphenom_weights, normalization="self"),
    "dinov2": Format(is_dinov2, dinov2_model, timm_weights),
    "timm": Format(is_timm, timm_model, timm_weights),
}


def detect(src: Source) -> str:
    for name, fmt in FORMATS.items():
        if fmt.detect(src):
            return name
    raise CellrepError(
        f"{src.path} is in none of the known formats ({', '.join(FORMATS)})",
        fix="see docs/encoders.md for the layouts cellrep reads",
    )


def _refuse(problems: list[str], src: Source, req: Request, fmt: str, model: dict) -> None:
    if problems:
        raise CellrepError(
            f"{req.setting}: the {fmt} weights in {src.path} do not fit {model['name']} "
            f"({req.in_chans} channels):\n    " + "\n    ".join(problems),
            fix="name the architecture the weights were saved from (encoder_model=... / model.name=...) "
            f"and its options; for this file: model.name={model['name']} model.kwargs={model.get('kwargs') or {}}",
        )


def published_normalization(path: str | Path, setting: str = "encoder") -> Optional[str]:
    """The data.normalization an encoder needs (None: the data's own), known before the data is opened."""
    src = read_source(path, setting)
    return FORMATS[detect(src)].normalization


def load_published_encoder(
    path: str | Path,
    encoder_model: Optional[str],
    in_chans: int,
    channels: Optional[str] = None,
    img_size: Optional[int] = None,
    setting: str = "encoder",
) -> tuple[nn.Module, dict[str, Any]]:
    """A published encoder (or a cellrep checkpoint) as a frozen backbone, in eval mode.

    Returns it with the meta of :func:`cellrep.models.checkpoint.load_backbone` (``model``,
    ``in_chans``, ``num_classes``) plus ``format``, ``normalization`` and ``notes``.
    """
    src = read_source(path, setting)
    name = detect(src)
    if name == "cellrep":
        backbone, meta = load_backbone(src.path, setting)
        return backbone, {**meta, "format": name, "normalization": None, "notes": []}
    fmt, req = FORMATS[name], Request(setting, int(in_chans), encoder_model, channels, img_size)
    model = fmt.model(src, req)
    backbone = build_backbone(model["name"], in_chans=req.in_chans, img_size=model["img_size"], **model["kwargs"])
    weights = fmt.weights(src, backbone, req)
    _refuse(fit_problems(weights, backbone), src, req, name, model)
    backbone.load_state_dict(weights)
    for note in src.notes:
        log.info("%s: %s", src.path, note)
    meta = {"model": model, "in_chans": req.in_chans, "num_classes": None}
    return backbone.eval(), {**meta, "format": name, "normalization": fmt.normalization, "notes": list(src.notes)}


def init_backbone(
    backbone: nn.Module,
    path: str | Path,
    model_name: str,
    in_chans: int,
    channels: Optional[str] = None,
    setting: str = "task.init_from",
) -> list[str]:
    """``task.init_from``: copy a cellrep checkpoint's or a published encoder's weights into ``backbone``.

    Returns the keys left at initialization (a new classifier head). The backbone must be the
    architecture the weights were saved from (``model.name``, ``model.kwargs``).
    """
    src = read_source(path, setting)
    name = detect(src)
    if name == "cellrep":
        return load_encoder(backbone, src.path, setting)
    fmt = FORMATS[name]
    req = Request(setting, int(in_chans), model_name, channels)
    weights = fmt.weights(src, backbone, req)
    head = classifier_keys(backbone)
    weights = {k: v for k, v in weights.items() if k not in head}
    model = fmt.model(src, req) if name == "openphenom" else {"name": model_name}
    _refuse(fit_problems(weights, backbone, fresh=head), src, req, name, model)
    result = backbone.load_state_dict(weights, strict=False)
    for note in src.notes:
        log.info("%s: %s", src.path, note)
    return sorted(result.missing_keys)
