"""Published encoders from local files: timm weights, the OpenPhenom release, DINOv2 checkpoints.

``cellrep-probe encoder=PATH`` / ``cellrep-eval encoder=PATH`` embed with one as a
baseline, ``task.init_from=PATH`` starts training from one. Nothing is downloaded.
Each format is one row of :data:`FORMATS` (detector, model it needs, key mapping);
the first row whose detector accepts the file wins:

* ``cellrep``: a cellrep-train checkpoint (read by :mod:`cellrep.models.checkpoint`);
* ``openphenom``: Recursion's channel-agnostic MAE ViT-S/16 release (a directory with
  ``config.json`` + ``model.safetensors``; recursionpharma/maes_microscopy), mapped onto
  cellrep's CA-ViT (``block=parallel``, see :func:`_openphenom_weights`);
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
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file
from timm.models._manipulate import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from cellrep.errors import CellrepError
from cellrep.models.backbone import build_backbone
from cellrep.models.checkpoint import (
    _named,
    _why,
    classifier_keys,
    fit_problems,
    load_backbone,
    load_encoder,
)
from cellrep.models.vit import sincos_pos_embed

log = logging.getLogger(__name__)

# encoder_channels=...: how a first convolution trained on other channels meets the data's
CHANNEL_ADAPTATIONS = ("repeat", "mean")


@dataclass(frozen=True)
class Request:
    """What the caller asks for: the data's channels and crop, and the options it was given."""

    setting: str  # the option that named the file, for messages
    in_chans: int
    encoder_model: Optional[str] = None
    channels: Optional[str] = None  # one of CHANNEL_ADAPTATIONS, or None: a mismatch is an error
    img_size: Optional[int] = None  # the data's crop size (ViTs are built for it)


@dataclass
class Source:
    path: Path
    state: dict[str, torch.Tensor]  # the file's tensors, unwrapped from {"state_dict": ...}
    raw: Any = None  # what the file held (a cellrep checkpoint keeps its hyper-parameters there)
    config: Optional[dict] = None  # a release directory's config.json
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Format:
    detect: Callable[[Source], bool]
    model: Callable[[Source, Request], dict]  # {"name", "img_size", "kwargs"}, as cellrep hyper-parameters
    weights: Callable[[Source, nn.Module, Request], dict[str, torch.Tensor]]  # in the built model's keys
    normalization: Optional[str] = None  # the data.normalization it needs (None: the data's own)


# -- reading ------------------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def read_tensors(path: Path, setting: str) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, what the file held): safetensors, else ``torch.load(weights_only=True)`` (no code runs).

    By content, not by name: maes_microscopy's ``save_pretrained`` writes a torch file named
    ``model.safetensors``.
    """
    fix = "pass a .safetensors file or a torch state dict of tensors (torch.save(model.state_dict(), ...))"
    try:
        if _is_safetensors(path):
            return load_file(path), None
        try:  # memory-mapped: a cellrep checkpoint is read again by models/checkpoint.py, cheaply
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) torch format cannot be mapped
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — unsafe pickle, truncated file, not weights at all
        raise CellrepError(
            f"{setting}: {path} is not a readable weights file: only tensors and plain containers are loaded, "
            f"since unpickling anything else could run code ({_why(exc)})",
            fix=f"{fix}; a file holding other Python objects is refused whatever its origin",
        ) from None
    state = raw
    for key in ("state_dict", "model"):  # Lightning / maes_microscopy / DeiT-style wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CellrepError(f"{setting}: {path} holds no state dict of tensors", fix=fix)
    return state, raw


def read_source(path: str | Path, setting: str) -> Source:
    path = Path(path).expanduser()
    if path.is_dir():
        weights, config = path / "model.safetensors", path / "config.json"
        if not weights.is_file() or not config.is_file():
            raise CellrepError(
                f"{setting}: the directory {path} is not a published release (no config.json + model.safetensors)",
                fix="point it at an OpenPhenom release directory, or at a weights file itself",
            )
        state, raw = read_tensors(weights, setting)
        try:
            cfg = json.loads(config.read_text())
        except ValueError as exc:
            raise CellrepError(f"{setting}: {config} is not JSON ({exc})", fix="restore the release's config.json")
        return Source(path, state, raw, cfg)
    if not path.is_file():
        raise CellrepError(f"{setting}: {path} does not exist", fix="pass a weights file or a release directory")
    state, raw = read_tensors(path, setting)
    return Source(path, state, raw)


# -- timm state dicts (and the channel adaptation) ----------------------------------------------


def _need_model(src: Source, req: Request, example: str) -> str:
    if not req.encoder_model:
        raise CellrepError(
            f"{req.setting}: {src.path} holds bare weights; which timm architecture they belong to is not in the file",
            fix=f"name it: encoder_model=<timm name>, e.g. encoder_model={example}",
        )
    return req.encoder_model


def _timm_model(src: Source, req: Request) -> dict:
    return {"name": _need_model(src, req, "resnet18"), "img_size": req.img_size, "kwargs": {}}


def _first_conv(model: nn.Module) -> Optional[str]:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    name = name[0] if isinstance(name, (tuple, list)) else name
    return f"{name}.weight" if name else None


def adapt_channels(weight: torch.Tensor, in_chans: int, how: str) -> torch.Tensor:
    """A first-conv weight ``O×I×k×k`` for ``in_chans`` channels.

    ``repeat`` is timm's ``adapt_input_conv``: the source filters tiled over the new channels
    and scaled by ``I / in_chans`` (summed for one channel), so the summed response to inputs
    of similar statistics keeps its size. ``mean``: every channel gets the source filters' sum
    divided by ``in_chans`` (timm's single-channel sum, spread evenly): an image equal in every
    channel gives exactly the source's response to a grey image, and no channel is favoured.
    """
    if how == "repeat":
        return adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])
    summed = adapt_input_conv(1, weight, base_chans=weight.shape[1])
    return (summed.float().repeat(1, in_chans, 1, 1) / in_chans).to(weight.dtype)


def _timm_weights(src: Source, model: nn.Module, req: Request) -> dict[str, torch.Tensor]:
    weights = dict(src.state)
    if isinstance(model, VisionTransformer):
        # timm's own loader step: DINOv2 key conversion, position table resampled to this crop's grid
        before = weights.get("pos_embed")
        weights = checkpoint_filter_fn(weights, model)
        after = weights.get("pos_embed")
        if before is not None and after is not None and before.shape != after.shape:
            src.notes.append(f"pos_embed resampled {tuple(before.shape)} → {tuple(after.shape)} for the crop size")
    expected = model.state_dict()
    head = classifier_keys(model) | {k for k in weights if _is_head(model, k) and k not in expected}
    dropped = sorted(k for k in head if k in weights)
    if dropped:  # its classes are not this data's
        src.notes.append(f"classifier dropped: {', '.join(dropped)}")
        weights = {k: v for k, v in weights.items() if k not in head}
    conv = _first_conv(model)
    if conv in weights and conv in expected and weights[conv].ndim == 4:
        have, want = weights[conv].shape[1], expected[conv].shape[1]
        if have != want:
            if req.channels is None:
                raise CellrepError(
                    f"{req.setting}: the first convolution of {src.path} ({conv}) takes {have} channels; "
                    f"the data has {want}",
                    fix="choose an adaptation: encoder_channels=repeat (timm's adapt_input_conv: filters tiled "
                    f"and scaled by {have}/{want}) or encoder_channels=mean (their sum split evenly over the "
                    "channels); for task.init_from: task.init_channels=repeat|mean",
                )
            weights[conv] = adapt_channels(weights[conv], want, req.channels)
            src.notes.append(f"{conv}: {have} → {want} channels ({req.channels})")
    return weights


def _is_head(model: nn.Module, key: str) -> bool:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (name,) if isinstance(name, str) else tuple(name)
    return any(key.startswith(f"{n}.") for n in names)


def _is_timm(src: Source) -> bool:
    return src.config is None


# -- DINOv2 -------------------------------------------------------------------------------------

_DINOV2_WIDTHS = {
    384: "vit_small_patch14",
    768: "vit_base_patch14",
    1024: "vit_large_patch14",
    1536: "vit_giant_patch14",
}


def _is_dinov2(src: Source) -> bool:
    return src.config is None and "mask_token" in src.state and "blocks.0.ls1.gamma" in src.state


def _dinov2_model(src: Source, req: Request) -> dict:
    width = int(src.state["cls_token"].shape[-1]) if "cls_token" in src.state else 0
    regs = int(src.state["register_tokens"].shape[1]) if "register_tokens" in src.state else 0
    guess = f"{_DINOV2_WIDTHS.get(width, 'vit_small_patch14')}{f'_reg{regs}' if regs else ''}_dinov2"
    return {"name": _need_model(src, req, guess), "img_size": req.img_size, "kwargs": {}}


# -- OpenPhenom (maes_microscopy) ---------------------------------------------------------------

_OP = "encoder.vit_backbone."
# the MAE's other parts: the reconstruction decoder, not part of the encoder
_OP_OTHER = ("decoder.", "encoder_decoder_proj.", "decoder_pred.")
_CA_VIT_NAMES = {
    (16, 384, 12, 6): "ca_vit_small_patch16",
    (16, 768, 12, 12): "ca_vit_base_patch16",
    (16, 1024, 24, 16): "ca_vit_large_patch16",
    (8, 1024, 24, 16): "ca_vit_large_patch8",
}
OPENPHENOM_CROP = 256  # its position table covers a 16×16 grid of 16-px patches per channel


def _is_openphenom(src: Source) -> bool:
    return f"{_OP}patch_embed.proj.weight" in src.state


def _openphenom_shape(src: Source) -> tuple[int, int, int, int, int]:
    """(patch, width, depth, heads, channel slots) read from the weights themselves."""
    s = src.state
    enc = (src.config or {}).get("encoder") or {}
    if src.config is not None and not enc.get("channel_agnostic", False):
        raise CellrepError(
            f"{src.path}: config.json describes a MAE encoder that is not channel-agnostic",
            fix="only the channel-agnostic release (encoder.channel_agnostic: true) maps onto cellrep's CA-ViT",
        )
    proj = s[f"{_OP}patch_embed.proj.weight"]
    if proj.shape[1] != 1:
        raise CellrepError(f"{src.path}: its patch embedding takes {proj.shape[1]} channels, not one per channel")
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in s if (m := re.match(rf"{re.escape(_OP)}blocks\.(\d+)\.", k)))
    qn = s.get(f"{_OP}blocks.0.q_norm.weight")
    heads = width // int(qn.shape[0]) if qn is not None else 6
    grid = OPENPHENOM_CROP // patch
    slots = (int(s[f"{_OP}pos_embed"].shape[1]) - 1) // (grid * grid)
    return patch, width, depth, heads, int(enc.get("max_in_chans", slots))


def _openphenom_model(src: Source, req: Request) -> dict:
    patch, width, depth, heads, slots = _openphenom_shape(src)
    if req.in_chans > slots:
        raise CellrepError(
            f"{req.setting}: the data has {req.in_chans} channels; {src.path} was trained for at most {slots}",
            fix=f"evaluate on at most {slots} channels (data.channel_names=[...])",
        )
    if "blocks.0.in_proj.weight" not in {k[len(_OP) :] for k in src.state if k.startswith(_OP)}:
        raise CellrepError(
            f"{src.path}: its blocks are not timm ParallelScalingBlocks (no blocks.0.in_proj.weight)",
            fix="only the released OpenPhenom layout (vit_small_patch16_256: parallel blocks, qk-norm) is mapped",
        )
    kwargs: dict[str, Any] = {
        "patch_size": patch,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "max_channels": slots,
        "global_pool": "avg",  # config.json: vit_small_patch16_256(global_pool="avg")
        "block": "parallel",
        "qk_norm": f"{_OP}blocks.0.q_norm.weight" in src.state,
        "init_values": 1e-4 if f"{_OP}blocks.0.ls.gamma" in src.state else None,
        "final_norm": f"{_OP}norm.weight" in src.state,
        "pos_layout": "hw",
    }
    name = _CA_VIT_NAMES.get((patch, width, depth, heads), "ca_vit_small_patch16")
    if req.img_size is not None and req.img_size != OPENPHENOM_CROP:
        src.notes.append(
            f"crop {req.img_size} px: OpenPhenom was trained on {OPENPHENOM_CROP}-px crops (the CA-ViT computes "
            "the same sin-cos positions for any grid; the release's own code would misplace them)"
        )
    return {"name": name, "img_size": None, "kwargs": kwargs}


def _hw_sincos(grid: int, width: int) -> torch.Tensor:
    pos = sincos_pos_embed((grid, grid), width)
    sin_h, sin_w, cos_h, cos_w = pos.chunk(4, dim=-1)
    return torch.cat([sin_h, cos_h, sin_w, cos_w], dim=-1)


def _openphenom_weights(src: Source, model: nn.Module, req: Request) -> dict[str, torch.Tensor]:
    """The release's encoder in CA-ViT keys. What differs from a CA-ViT, and how it is represented:

    * channels: OpenPhenom adds the SAME position embedding to every channel and has no channel
      embedding, so ``channel_embed`` is all zeros (tokens are channel-major in both);
    * positions: its fixed table is sin-cos with quarters [sin h|cos h|sin w|cos w]
      (``pos_layout=hw``); the file's table is checked against it, not loaded;
    * blocks: timm ``ParallelScalingBlock`` with qk-norm and LayerScale (``block=parallel``).
      The release was trained with timm 0.9.7, whose block added ``cat(zeros(3·D), mlp_bias)``
      to the fused [mlp|q|k|v] in-projection (timm issue #2653, fixed since): that exact vector
      becomes ``in_proj.bias``, so the forward is the trained one;
    * end: ``global_pool="avg"`` makes timm's final ``norm`` an Identity and the untrained
      ``fc_norm`` is never applied by the release's ``predict`` (mean of the patch tokens of
      the last block): ``final_norm=False``, ``fc_norm`` dropped.
    """
    s = src.state
    if not getattr(model, "channel_agnostic", False):
        raise CellrepError(
            f"{req.setting}: {src.path} is a channel-agnostic OpenPhenom encoder; the model is {type(model).__name__}",
            fix="train a CA-ViT of its shape: "
            f"model.name=ca_vit_small_patch16 model.kwargs={_openphenom_model(src, req)['kwargs']}",
        )
    unknown = sorted(k for k in s if not k.startswith(_OP) and not k.startswith(_OP_OTHER))
    if unknown:
        raise CellrepError(
            f"{req.setting}: {src.path} is not the OpenPhenom layout: {_named('unexpected keys', unknown)}",
            fix="pass the release directory as published (config.json + model.safetensors)",
        )
    enc = {k[len(_OP) :]: v for k, v in s.items() if k.startswith(_OP)}
    width = int(enc["cls_token"].shape[-1])
    grid = OPENPHENOM_CROP // int(model.patch_size)
    table = torch.cat([torch.zeros(1, width), _hw_sincos(grid, width).repeat(model.max_channels, 1)])[None]
    pos = enc.pop("pos_embed", None)
    if pos is None or pos.shape != table.shape or not torch.allclose(pos.float(), table, atol=1e-4):
        raise CellrepError(
            f"{req.setting}: the position embedding of {src.path} is not the fixed per-channel sin-cos table "
            f"{tuple(table.shape)} of the OpenPhenom release; a CA-ViT computes its positions and cannot hold "
            "a learned or different table",
            fix="use the release's weights as published",
        )
    out: dict[str, torch.Tensor] = {"channel_embed": torch.zeros(model.max_channels, width)}
    dropped = [k for k in ("fc_norm.weight", "fc_norm.bias") if k in enc]
    for k, v in enc.items():
        if k in dropped:
            continue
        k = {"patch_embed.proj.weight": "patch_embed.weight", "patch_embed.proj.bias": "patch_embed.bias"}.get(k, k)
        m = re.fullmatch(r"blocks\.(\d+)\.mlp_bias", k)
        if m:  # the bias timm 0.9.7 applied to [mlp|q|k|v] (see above)
            k, v = f"blocks.{m.group(1)}.in_proj.bias", torch.cat([torch.zeros(3 * width, dtype=v.dtype), v])
        out[k] = v
    other = sum(k.startswith(_OP_OTHER) for k in s)
    src.notes.append(
        f"OpenPhenom: channel_embed zero (none in the release), fc_norm unused, {other} decoder tensors left out"
    )
    return out


def _is_cellrep(src: Source) -> bool:
    return isinstance(src.raw, dict) and "hyper_parameters" in src.raw and "state_dict" in src.raw


# name → (detector, model it needs, mapping); the first detector that accepts the file wins
FORMATS: dict[str, Format] = {
    "cellrep": Format(_is_cellrep, lambda s, r: {}, lambda s, m, r: {}),  # models/checkpoint.py reads it
    "openphenom": Format(_is_openphenom, _openphenom_model, _openphenom_weights, normalization="self"),
    "dinov2": Format(_is_dinov2, _dinov2_model, _timm_weights),
    "timm": Format(_is_timm, _timm_model, _timm_weights),
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
