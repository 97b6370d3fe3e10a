"""Framework overhead: a training step through Trainer + LightningModule vs a bare PyTorch loop.

docs/PERFORMANCE.md bar: ≤ 5% more time per step. Both sides run the same model
(``SupervisedTask``'s backbone, default CPU config: resnet18, 6 channels),
the same in-memory batches, fp32, the same AdamW + per-step LR schedule
(``configure_optimizers``), forward → cross-entropy → backward → step →
zero_grad. The Lightning side is ``Trainer.fit`` with logging, checkpointing,
progress bar and validation off (what a step costs, not what callbacks cost).

Steady state only: each run times steps ``warmup .. warmup + steps`` (a
callback / the loop reads the clock after each step), so start-up, the first
allocations and Trainer set-up are excluded. The two sides alternate
``--repeats`` times; the overhead is the median of per-pair ratios.

    python benchmarks/step_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cellrep  # noqa: F401, E402  (torchvision compat before lightning/timm)

# isort: split
import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import machine, median, table  # noqa: E402

from cellrep.training.tasks.supervised import SupervisedTask  # noqa: E402

OPT = {"name": "adamw", "base_lr": 4e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]}
SCHED = {"warmup_fraction": 0.05, "min_lr_ratio": 0.01}


class _Clock(L.Callback):
    def __init__(self):
        self.t: list[float] = []

    def on_train_batch_end(self, *args, **kwargs):
        self.t.append(time.perf_counter())


class _Data(L.LightningDataModule):
    def __init__(self, batches, batch_size):
        super().__init__()
        self.batches, self.batch_size = batches, batch_size

    def train_dataloader(self):
        return _Batches(self.batches)


class _Batches:
    """An in-memory loader (a plain list would be read by Lightning as several loaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def lightning_time(task: SupervisedTask, batches, batch_size: int, warmup: int, steps: int) -> float:
    clock = _Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(task, datamodule=_Data(batches, batch_size))
    return (clock.t[warmup + steps - 1] - clock.t[warmup - 1]) / steps


def bare_time(task: SupervisedTask, batches, warmup: int, steps: int) -> float:
    """The same step written by hand: the optimizer and schedule come from the task itself."""
    from cellrep.training.optim import build_optimizer, scaled_lr, warmup_cosine

    model = task.backbone
    model.train()
    opt = build_optimizer(
        task, OPT["name"], scaled_lr(OPT["base_lr"], len(batches[0]["label"])), OPT["weight_decay"], tuple(OPT["betas"])
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup + steps, **SCHED))
    t = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        if not torch.isfinite(loss):  # the task checks this too (it syncs the same way)
            raise RuntimeError("non-finite loss")
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
    return (t[-1] - t[warmup - 1]) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--crop", type=int, default=48)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps the timing stable on a shared machine (idle OpenMP threads "
        "spin-wait for cores other jobs hold)",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.batch_size, a.crop, a.warmup, a.steps, a.repeats = 4, 32, 2, 3, 1
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    classes = 32
    batches = [
        {
            "image": torch.randn(a.batch_size, 6, a.crop, a.crop),
            "label": torch.randint(0, classes, (a.batch_size,)),
            "index": torch.arange(a.batch_size),
        }
        for _ in range(4)
    ]
    first = SupervisedTask({"name": a.model}, 6, classes, OPT, SCHED)
    n = a.warmup + a.steps
    lit, bare = [], []
    for _ in range(a.repeats):
        lit.append(lightning_time(copy.deepcopy(first), (batches * n)[:n], a.batch_size, a.warmup, a.steps))
        bare.append(bare_time(copy.deepcopy(first), batches, a.warmup, a.steps))
    over = median([x / y - 1 for x, y in zip(lit, bare)])
    print(f"# machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(
        f"# {a.model}, 6×{a.crop}×{a.crop}, batch {a.batch_size}, fp32, AdamW; {a.steps} timed steps after "
        f"{a.warmup} warm-up, {a.repeats} alternating repeats (medians)"
    )
    print(
        table(
            ["loop", "ms/step", "overhead (bar ≤ 5%)"],
            [
                ["bare PyTorch", 1000 * median(bare), "—"],
                ["Trainer + SupervisedTask", 1000 * median(lit), f"{100 * over:+.1f}%"],
            ],
        )
    )


if __name__ == "__main__":
    main()
