"""Reading a weights file or a release directory safely, and the types every format shares."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file

from cellrep.errors import CellrepError
from cellrep.models.checkpoint import _why


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


def need_model(src: Source, req: Request, example: str) -> str:
    if not req.encoder_model:
        raise CellrepError(
            f"{req.setting}: {src.path} holds bare weights; which timm architecture they belong to is not in the file",
            fix=f"name it: encoder_model=<timm name>, e.g. encoder_model={example}",
        )
    return req.encoder_model
