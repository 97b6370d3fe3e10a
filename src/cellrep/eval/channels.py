"""Evaluation over channel subsets (docs/benchmarks.md, "Channel subsets").

Which channels a model is shown at evaluation, and what it loses without each:

* :func:`match_channels` (run by ``pipeline.prepare``) maps the data's channels onto the model. A
  channel-agnostic ViT (``ca_vit_*``) is matched by channel NAME against the names its checkpoint
  recorded (the training data's ``channel_names``), so a model trained on 6 channels embeds a screen
  of any subset of them with the right channel embeddings; an unknown name is an error. A
  fixed-channel model (ResNet, ``vit_*``) needs the training channel count.
* ``channels=[DNA,ER]`` (names or indices of the data's channels) embeds with those only: a CA-ViT
  gets fewer tokens (the other channels are dropped, ``input_channel_ids`` keeps the right slots); a
  fixed-channel model sees the others as zeros after normalization (0 is the normalized mean).
* :func:`leave_one_channel_out` probes the best block once per channel with that channel removed
  (``probe.leave_one_channel_out``): C more backbone passes, one probe each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cellrep.errors import CellrepError  # noqa: E402
from cellrep.eval.features import block_names, extract_block_features  # noqa: E402
from cellrep.eval.probe import ProbeSettings, train_probes  # noqa: E402
from cellrep.io import atomic_write_text  # noqa: E402
from cellrep.models.checkpoint import read_checkpoint  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class ChannelPlan:
    """How the data's channels reach the model: ``slots[i]`` is the model's channel slot of data channel
    i (CA-ViT; None for a fixed-channel model), ``keep`` the data channels evaluated (indices)."""

    names: list[str]  # the data's channel names
    channel_agnostic: bool
    slots: list[int] | None
    keep: list[int]

    @property
    def kept_names(self) -> list[str]:
        return [self.names[i] for i in self.keep]


def resolve_channels(requested, names: list[str]) -> list[int]:
    """``channels=[...]`` → sorted indices into ``names``; each entry a name or an index."""
    out = []
    for item in requested:
        s = str(item)
        if s in names:
            out.append(names.index(s))
        elif s.lstrip("-").isdigit() and -len(names) <= int(s) < len(names):
            out.append(int(s) % len(names))
        else:
            raise CellrepError(f"unknown channel {s!r}", fix=f"use names of the data's channels {names} or indices")
    if not out or len(set(out)) != len(out):
        raise CellrepError(
            f"channels={list(requested)} is empty or names a channel twice", fix=f"pick distinct channels of {names}"
        )
    return sorted(out)


def checkpoint_channel_names(ckpt_path) -> list[str] | None:
    """The training data's channel names the task recorded in the checkpoint (None: an older checkpoint).

    Memory-mapped and ``weights_only``: only the hyper-parameters are touched, nothing is unpickled."""
    try:
        ckpt = torch.load(Path(ckpt_path).expanduser(), map_location="cpu", weights_only=True, mmap=True)
        hparams = (ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    except Exception:  # noqa: BLE001 — not memory-mappable (an old file format): the checkpoint reader says why
        hparams = read_checkpoint(ckpt_path).hparams
    names = hparams.get("channel_names") if isinstance(hparams, dict) else None
    return [str(n) for n in names] if names else None


def model_slots(data_names: list[str], trained: list[str] | None, in_chans: int) -> list[int]:
    """Channel slot of each data channel of a CA-ViT trained on ``trained`` (by name)."""
    if trained is None:
        if len(data_names) != in_chans:
            raise CellrepError(
                f"the checkpoint takes {in_chans} channels, the data has {len(data_names)}, and the checkpoint "
                "records no channel names to match them by",
                fix="evaluate on data with the training channels, or retrain (checkpoints now record channel_names)",
            )
        return list(range(in_chans))
    unknown = [n for n in data_names if n not in trained]
    if unknown:
        raise CellrepError(
            f"channel(s) {unknown} of the data were not among the model's training channels {trained}",
            fix="evaluate on data whose channel_names are a subset of the training channels (rename them in "
            "data.channel_names if they are the same stains)",
        )
    return [trained.index(n) for n in data_names]


def match_channels(backbone, meta: dict, dm, ckpt_path, requested=None) -> ChannelPlan:
    """Map the data's channels onto the model (module docstring), apply ``requested``, keep the plan on
    ``dm.channel_plan``. A fixed-channel model with another channel count is an error. ``meta``: what
    the loader of the model returned (a published encoder's ``format`` says it was built for the data)."""
    names, in_chans = list(dm.channel_names), int(meta["in_chans"])
    agnostic = bool(getattr(backbone, "channel_agnostic", False))
    if meta.get("format") not in (None, "cellrep"):  # a published encoder is built for the data's channels, in order
        slots = list(range(len(names))) if agnostic else None
    elif agnostic:
        slots = model_slots(names, checkpoint_channel_names(ckpt_path), in_chans)
    elif len(names) != in_chans:
        raise CellrepError(
            f"the checkpoint takes {in_chans} channels but the data has {len(names)}",
            fix="evaluate on the data the model was trained on (use_run_config=true), or train a ca_vit_* "
            "model, which embeds any subset of its training channels",
        )
    else:
        slots = None
    keep = resolve_channels(requested, names) if requested else list(range(len(names)))
    plan = ChannelPlan(names, agnostic, slots, keep)
    apply_channels(backbone, dm, plan, keep)
    dm.channel_plan = plan
    if keep != list(range(len(names))) or (slots is not None and slots != list(range(len(names)))):
        how = "dropped" if agnostic else "zero-filled"
        log.info("evaluating channels %s (others %s), model slots %s", plan.kept_names, how, slots)
    return plan


def apply_channels(backbone, dm, plan: ChannelPlan, keep: list[int]) -> None:
    """Evaluation loaders made from now on show the model only data channels ``keep``."""
    if plan.channel_agnostic:
        dm.set_eval_channels(keep=None if keep == list(range(len(plan.names))) else keep)
        slots = [plan.slots[i] for i in keep]
        identity = slots == list(range(len(slots)))
        backbone.input_channel_ids = None if identity else torch.tensor(slots, dtype=torch.long)
    else:
        dm.set_eval_channels(zero=[i for i in range(len(plan.names)) if i not in keep] or None)


def leave_one_channel_out(
    backbone,
    dm,
    device,
    block: str,
    all_channels_acc: float,
    settings: ProbeSettings,
    progress: bool = False,
    context=None,  # the model's cell-type context (eval.features.SiteContext), as for the other blocks
) -> pd.DataFrame:
    """Held-out top-1 of ``block``'s probe with each evaluated channel removed, next to all of them.

    One backbone pass (stopping at ``block``) and one probe per channel; the plan is restored after."""
    plan: ChannelPlan = dm.channel_plan
    if len(plan.keep) < 2:
        raise CellrepError(
            f"leave-one-channel-out needs at least 2 channels, the evaluation has {plan.kept_names}",
            fix="set probe.leave_one_channel_out=false, or evaluate more channels",
        )
    k = block_names(backbone).index(block)
    rows = [{"removed": "none (all channels)", "channels": len(plan.keep), "test_acc": float(all_channels_acc)}]
    try:
        for c in plan.keep:
            apply_channels(backbone, dm, plan, [i for i in plan.keep if i != c])
            feats = extract_block_features(backbone, dm.eval_dataloader("all"), [k], device, progress, context)
            sites = dm.index.iloc[feats.rows]
            result = train_probes(
                feats.features,
                sites["label"].to_numpy(),
                sites["split"].to_numpy(),
                dm.num_classes,
                replace(settings, knn=False),
                progress=False,
            )
            acc = float(result.table["test_acc"].iloc[0])
            rows.append({"removed": plan.names[c], "channels": len(plan.keep) - 1, "test_acc": acc})
    finally:
        apply_channels(backbone, dm, plan, plan.keep)
    table = pd.DataFrame(rows)
    table["delta"] = table["test_acc"] - float(all_channels_acc)
    table.insert(0, "block", block)
    return table


def save_channel_outputs(out_dir: Path, table: pd.DataFrame) -> dict[str, Path]:
    """``probe_channels.csv`` and ``probe_channels.png`` (a bar per removed channel, all channels dashed)."""
    out_dir = Path(out_dir)
    csv = atomic_write_text(out_dir / "probe_channels.csv", table.to_csv(index=False))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(table) + 2), 3.2))
    loco = table.iloc[1:]
    ax.bar(range(len(loco)), loco["test_acc"], color="tab:blue")
    ax.axhline(float(table["test_acc"].iloc[0]), color="tab:red", ls="--", lw=1, label="all channels")
    ax.set_xticks(range(len(loco)), loco["removed"], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("channel removed")
    ax.set_ylabel("held-out top-1")
    ax.set_title(f"leave one channel out ({table['block'].iloc[0]})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = out_dir / "probe_channels.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return {"channels_csv": csv, "channels_plot": png}


def channel_summary(table: pd.DataFrame) -> dict:
    """The table for metrics.json: block, all-channels accuracy and per removed channel accuracy and delta."""
    loco = table.iloc[1:]
    return {
        "block": str(table["block"].iloc[0]),
        "all_channels": float(table["test_acc"].iloc[0]),
        "test_acc": {r.removed: float(r.test_acc) for r in loco.itertuples()},
        "delta": {r.removed: float(r.delta) for r in loco.itertuples()},
    }
