"""Start a supervised backbone from a pretrained encoder (``task.init_from=<checkpoint>``).

The keys must match exactly: a silently half-loaded encoder trains, reports
plausible numbers, and wastes the pretraining. So every encoder tensor must
find its place with its shape, and every backbone tensor must come from the
checkpoint, except the new classifier head. Anything else is an error that
names the keys.

Accepted checkpoints: an MAE run's (encoder under ``mae.encoder.``) or a
supervised run's (backbone under ``backbone.``; its head is dropped, since
its classes are not this run's).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from cellrep.errors import CellrepError

ENCODER_PREFIXES = ("mae.encoder.", "backbone.")
SHOWN = 8  # keys named per kind of mismatch; the count says how many more


def classifier_keys(backbone: nn.Module) -> set[str]:
    """State-dict keys of the backbone's classifier head (new in a fine-tuning run)."""
    head = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
    if head is None:
        return set()
    for name, module in backbone.named_modules():
        if module is head and name:
            return {f"{name}.{key}" for key in head.state_dict()}
    return set()


def _named(kind: str, keys: list[str]) -> str:
    more = f" (and {len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return f"{kind}: {', '.join(keys[:SHOWN])}{more}"


def read_encoder_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(encoder state dict without prefix, the prefix found, the run's hyperparameters)."""
    path = Path(path)
    if not path.is_file():
        raise CellrepError(
            f"task.init_from: no checkpoint at {path}",
            fix="point task.init_from at an MAE run's checkpoints/last.ckpt or best.ckpt",
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — truncated file, not a checkpoint, ...
        raise CellrepError(
            f"task.init_from: cannot read {path} as a checkpoint ({exc})", fix="use a .ckpt written by cellrep-train"
        ) from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    for prefix in ENCODER_PREFIXES:
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            return weights, prefix, dict(ckpt.get("hyper_parameters") or {})
    raise CellrepError(
        f"task.init_from: {path} holds no encoder weights (no keys under {' or '.join(ENCODER_PREFIXES)}; "
        f"{_named('its keys', sorted(state))})",
        fix="use a checkpoint of a task=mae or task=supervised run",
    )


def load_encoder(backbone: nn.Module, path: str | Path) -> list[str]:
    """Copy the checkpoint's encoder into ``backbone``; returns the keys left at initialization (the head)."""
    weights, prefix, hparams = read_encoder_weights(path)
    head = classifier_keys(backbone)
    if prefix == "backbone.":
        weights = {k: v for k, v in weights.items() if k not in head}
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(weights) - head)
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(weights[k].shape)}≠{tuple(expected[k].shape)}"
        for k in set(weights) & set(expected)
        if weights[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        source = (hparams.get("model") or {}).get("name", "unknown model")
        problems = [
            _named(kind, keys)
            for kind, keys in (
                ("missing from the checkpoint", missing),
                ("unexpected in the checkpoint", unexpected),
                ("shape mismatch (checkpoint≠model)", mismatched),
            )
            if keys
        ]
        raise CellrepError(
            f"task.init_from: the encoder in {path} ({source}, {hparams.get('in_chans', '?')} channels) does not "
            f"fit this backbone ({type(backbone).__name__}):\n    " + "\n    ".join(problems),
            fix=f"fine-tune with the pretraining run's model (model.name={source}), channel count and data.crop_size",
        )
    result = backbone.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= head, result  # checked above
    return sorted(result.missing_keys)
