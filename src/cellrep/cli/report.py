"""What a person reads at the end of a run or a sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def run_report(metrics: dict[str, Any]) -> str:
    """A few lines: held-out accuracy against chance, and where the outputs are."""
    split, n_cls = metrics["split"], metrics["num_classes"]
    lines = [f"cellrep: {metrics['model']} on {metrics['dataset']} ({n_cls} classes), split={split}"]
    if "test/acc" in metrics:
        lines.append(
            f"  held-out ({metrics['test_description']}): top-1 {metrics['test/acc']:.3f}, "
            f"top-5 {metrics.get('test/acc_top5', float('nan')):.3f}  (chance {1 / n_cls:.3f})"
        )
        for name, value in sorted(metrics.items()):
            if name.startswith("test/acc/"):
                lines.append(f"    {name.removeprefix('test/acc/'):>12}: top-1 {value:.3f}")
    if "val/acc" in metrics:
        lines.append(f"  validation (training experiments): top-1 {metrics['val/acc']:.3f}")
    lines.append(f"  outputs: {metrics['run_dir']}")
    return "\n".join(lines)


def sweep_table(sweep_dir: Path) -> str | None:
    """One row per finished job of a multirun: its overrides and held-out accuracy."""
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: p.parent.name):
        metrics = json.loads(metrics_file.read_text())
        overrides_file = metrics_file.parent / ".hydra" / "overrides.yaml"
        overrides = " ".join(OmegaConf.load(overrides_file)) if overrides_file.exists() else metrics_file.parent.name
        rows.append((overrides, metrics.get("test/acc"), metrics.get("test/acc_top5"), 1 / metrics["num_classes"]))
    if not rows:
        return None
    width = max(len(r[0]) for r in rows)
    fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    lines = [
        f"{'job':<{width}}  top-1   top-5   chance",
        *(f"{o:<{width}}  {fmt(a)}  {fmt(a5)}  {fmt(c)}" for o, a, a5, c in rows),
    ]
    return "\n".join(lines)


class MultirunSummary(Callback):
    """Prints every job's held-out accuracy side by side when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        table = sweep_table(Path(config.hydra.sweep.dir))
        if table:
            print(f"\nheld-out accuracy per job (sweep dir {config.hydra.sweep.dir}):\n{table}")
