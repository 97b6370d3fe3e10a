"""Reading a cellrep checkpoint: its weights and hyper-parameters, safely, and its encoder, exactly.

One reader for every consumer: evaluation builds the frozen backbone from a
checkpoint (``cellrep-probe``, ``cellrep-eval``), ``task.init_from`` starts a
supervised backbone from a pretrained encoder, and the de novo protocol
reloads its best checkpoint.

Safe: checkpoints travel (a colleague's run, a download), and unpickling runs
whatever code the pickle names. So every file is read with
``torch.load(weights_only=True)``, which accepts tensors and plain containers
only; cellrep's tasks save nothing else (their hyper-parameters are the plain
dicts ``cellrep-train`` builds). Anything else is refused, never run.

Exact: a silently half-loaded encoder trains, reports plausible numbers, and
wastes the pretraining. So every encoder tensor must find its place with its
shape, and every backbone tensor must come from the checkpoint, except a new
classifier head. Anything else is an error that names the keys.

A run trained with a cell-type context (``model.context_path``, docs/FEWSHOT.md) also
saved the context's projection next to its encoder: :func:`load_context` rebuilds it,
so evaluation embeds the encoder as it was trained (``cellrep.eval.checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cellrep.errors import CellrepError
from cellrep.models.backbone import build_backbone
from cellrep.models.context import CellTypeContext, takes_context_token

# Where each task keeps its encoder in the state dict (its LightningModule attribute path).
# DINO: the teacher's backbone, the encoder DINO evaluates (cellrep.training.tasks.dino).
# SimCLR keeps its backbone under backbone. as a supervised run does, so its checkpoints read as one.
ENCODER_PREFIXES: dict[str, str] = {"supervised": "backbone.", "mae": "mae.encoder.", "dino": "teacher.backbone."}
# Where each task keeps its cell-type context projection (cellrep.models.context), next to its encoder:
# DINO evaluates its teacher, so the teacher's projection (the EMA of the student's) goes with it.
CONTEXT_PREFIXES: dict[str, str] = {"supervised": "context.", "mae": "context.", "dino": "teacher.context."}
RUN_CONTEXT = "context.csv"  # the table a training run with model.context_path=synthetic wrote (knowledge/inputs.py)
SHOWN = 8  # keys named per kind of mismatch; the count says how many more
# torch's own advice in a weights_only refusal is to retry with weights_only=False: not ours to pass on.
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1) ", "(2) ")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    hparams: dict[str, Any]  # the task's save_hyperparameters (empty for a bare state dict)

    def encoder(self, setting: str) -> tuple[str, dict[str, torch.Tensor]]:
        """(the task that wrote it, its encoder's weights without the prefix)."""
        for task, prefix in ENCODER_PREFIXES.items():
            weights = {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}
            if weights:
                return task, weights
        raise CellrepError(
            f"{setting}: {self.path} holds no encoder weights (no keys under "
            f"{' or '.join(ENCODER_PREFIXES.values())}; {_named('its keys', sorted(self.state_dict))})",
            fix="use a checkpoint of a task=mae, task=dino, task=simclr or task=supervised run",
        )

    def context_weights(self, setting: str = "ckpt_path") -> dict[str, torch.Tensor]:
        """The cell-type context projection of the task that wrote it (``proj.weight``, ``proj.bias``), or {}."""
        task, _ = self.encoder(setting)
        prefix = CONTEXT_PREFIXES[task]
        return {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix + "proj.")}

    def context_table_path(self) -> Path | None:
        """Where the run's context table is: its ``model.context_path``, or for ``synthetic`` the table
        the run derived and wrote to its run directory (``<run>/context.csv``, next to ``checkpoints/``)."""
        path = (self.hparams.get("model") or {}).get("context_path")
        if not path:
            return None
        if str(path) == "synthetic":
            return self.path.resolve().parent.parent / RUN_CONTEXT
        return Path(str(path)).expanduser()


def _why(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [
        line.split(" Please use `torch.serialization")[0] for line in lines if not line.startswith(_TORCH_BOILERPLATE)
    ]
    return f"{type(exc).__name__}: {' '.join(kept[:2]) or (lines[0] if lines else 'no detail')}"


def read_checkpoint(path: str | Path, setting: str = "ckpt_path") -> Checkpoint:
    """The state dict and hyper-parameters of ``path``, loaded without running any code it holds.

    ``setting`` is the option that named the file, for the error messages.
    """
    path = Path(path).expanduser()
    fix = f"set {setting} to a .ckpt written by cellrep-train (<run>/checkpoints/best.ckpt or last.ckpt)"
    if not path.is_file():
        raise CellrepError(f"checkpoint {path} does not exist", fix=fix)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — unsafe pickle, truncated file, not a checkpoint at all, ...
        raise CellrepError(
            f"{setting}: {path} is not a readable cellrep checkpoint: only tensors and plain containers are "
            f"loaded, since unpickling anything else could run code ({_why(exc)})",
            fix=f"{fix}; a file holding other Python objects is refused whatever its origin, so re-save a "
            "checkpoint you trust with plain dicts for its state_dict and hyper_parameters",
        ) from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    hparams = (ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not isinstance(hparams, dict):
        raise CellrepError(f"{setting}: {path} is not a readable cellrep checkpoint (no state_dict)", fix=fix)
    return Checkpoint(path, state, dict(hparams))


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


def fit_problems(weights: dict[str, torch.Tensor], backbone: nn.Module, fresh: set[str] = frozenset()) -> list[str]:
    """What keeps ``weights`` from loading exactly into ``backbone`` (keys in ``fresh`` may stay unloaded)."""
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(weights) - fresh)
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(weights[k].shape)}≠{tuple(expected[k].shape)}"
        for k in set(weights) & set(expected)
        if weights[k].shape != expected[k].shape
    )
    return [
        _named(kind, keys)
        for kind, keys in (
            ("missing from the checkpoint", missing),
            ("unexpected in the checkpoint", unexpected),
            ("shape mismatch (checkpoint≠model)", mismatched),
        )
        if keys
    ]


def _described(ckpt: Checkpoint) -> str:
    return f"{(ckpt.hparams.get('model') or {}).get('name', 'unknown model')}, {ckpt.hparams.get('in_chans', '?')} channels"


def load_encoder(backbone: nn.Module, path: str | Path, setting: str = "task.init_from") -> list[str]:
    """Copy the checkpoint's encoder into ``backbone``; returns the keys left at initialization (the head).

    A supervised checkpoint's head is dropped: its classes are not this run's.
    """
    ckpt = read_checkpoint(path, setting)
    _, weights = ckpt.encoder(setting)
    head = classifier_keys(backbone)
    weights = {k: v for k, v in weights.items() if k not in head}
    problems = fit_problems(weights, backbone, fresh=head)
    if problems:
        source = (ckpt.hparams.get("model") or {}).get("name", "unknown model")
        raise CellrepError(
            f"{setting}: the encoder in {ckpt.path} ({_described(ckpt)}) does not fit this backbone "
            f"({type(backbone).__name__}):\n    " + "\n    ".join(problems),
            fix=f"fine-tune with the pretraining run's model (model.name={source}), channel count and data.crop_size",
        )
    result = backbone.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= head, result  # checked above
    return sorted(result.missing_keys)


def load_backbone(path: str | Path, setting: str = "ckpt_path") -> tuple[nn.Module, dict[str, Any]]:
    """The encoder of a cellrep task checkpoint, built from its hyper-parameters, in eval mode.

    Returns it with ``{"model", "in_chans", "num_classes"}`` from the run's hyper-parameters.
    """
    ckpt = read_checkpoint(path, setting)
    try:
        model = dict(ckpt.hparams["model"])
        in_chans = int(ckpt.hparams["in_chans"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CellrepError(
            f"{setting}: {ckpt.path} is not a readable cellrep checkpoint (its hyper_parameters lack {exc})",
            fix="use a checkpoint written by cellrep-train (checkpoints/best.ckpt or last.ckpt)",
        ) from None
    _, weights = ckpt.encoder(setting)
    num_classes = ckpt.hparams.get("num_classes")
    backbone = build_backbone(
        model["name"],
        in_chans=in_chans,
        num_classes=int(num_classes or 0),
        img_size=model.get("img_size"),
        **dict(model.get("kwargs") or {}),
    )
    problems = fit_problems(weights, backbone)
    if problems:
        raise CellrepError(
            f"{setting}: the weights in {ckpt.path} do not fit the {model['name']} its hyper-parameters "
            "describe:\n    " + "\n    ".join(problems),
            fix="the checkpoint and its hyper-parameters disagree: use the checkpoint as cellrep-train wrote it",
        )
    backbone.load_state_dict(weights)
    return backbone.eval(), {"model": model, "in_chans": in_chans, "num_classes": num_classes}


def load_context(
    ckpt: Checkpoint, backbone: nn.Module, table: torch.Tensor, setting: str = "ckpt_path"
) -> CellTypeContext | None:
    """The checkpoint's trained context projection over ``table`` (T×K, any cell types: the projection
    does not depend on which rows the table has), in eval mode, or None for a run without a context.

    The mode is the training's (cellrep.models.context): a token for a ViT, FiLM for anything else.
    """
    weights = ckpt.context_weights(setting)
    if not weights:
        return None
    mode = "token" if takes_context_token(backbone) else "film"
    context = CellTypeContext(table, backbone.num_features, mode)
    problems = fit_problems(weights, context)
    if problems:
        raise CellrepError(
            f"{setting}: the cell-type context projection in {ckpt.path} does not fit a {mode} context over "
            f"a {tuple(table.shape)} table for its {type(backbone).__name__}:\n    " + "\n    ".join(problems),
            fix="give the table the run was trained with (model.context_path=<csv>: same columns), "
            "or evaluate without the context (context=false)",
        )
    context.load_state_dict(weights)
    return context.eval()
