"""Re-running the same command resumes the run.

A run's identity is its directory. Unnamed runs get a new one every time
(``outputs/<task>/<date>/<time>_<id>``) and start fresh. Named runs
(``run_name=<name>``) live in ``outputs/<task>/runs/<name>`` (multiruns:
``outputs/<task>/multirun/runs/<name>/<job number>``), so the same command finds
the same directory; with ``resume=auto`` (the default) training continues from
its ``checkpoints/last.ckpt`` — model, optimizer, scheduler, loop counters and
the data position — and the wandb run continues under the id kept in
``wandb_id.txt``. ``resume=never`` refuses to touch an existing checkpoint;
an explicit ``ckpt_path=...`` always wins.

On SLURM, a requeued job re-runs the same command, so give sweeps and long jobs
a ``run_name`` (the submitit launcher's requeue then resumes).

Lightning's ``ddp`` strategy starts ranks 1.. by re-running ``sys.argv``; under
``-m`` that would start a nested multirun. :func:`pin_ddp_children` makes the
children a plain run of this job's overrides, in this job's directory, and
:func:`job_environment` undoes what a DDP job leaves in the process (the
process group, Lightning's MASTER_PORT/LOCAL_RANK variables) so the next job of
a multirun starts its own ranks.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, open_dict, read_write

from cellrep.errors import CellrepError
from cellrep.io import atomic_write_text

log = logging.getLogger(__name__)
RESUME_MODES = ("auto", "never")


def last_checkpoint(run_dir: Path | str) -> Path | None:
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def resume_checkpoint(cfg: DictConfig, run_dir: Path | str) -> str | None:
    """The checkpoint ``trainer.fit`` starts from: ``ckpt_path`` if given, else this run's last one."""
    mode = cfg.get("resume", "auto")
    if mode not in RESUME_MODES:
        raise CellrepError(
            f"resume={mode!r} is not one of {list(RESUME_MODES)}",
            fix="use resume=auto (continue a named run) or resume=never; "
            "to start from a file use ckpt_path=<checkpoint>",
        )
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    last = last_checkpoint(run_dir)
    if last is None:
        return None
    if mode == "never":
        raise CellrepError(
            f"{run_dir} already holds a checkpoint and resume=never",
            fix="use resume=auto to continue it, or another run_name",
        )
    log.info("resuming from %s", last)
    return str(last)


def wandb_run_id(run_dir: Path | str) -> str:
    """The run's wandb id, created on first use and kept in the run dir so a resumed run reuses it."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id + "\n")
    return run_id


def attach_wandb_identity(cfg: DictConfig, run_dir: Path | str) -> None:
    """Give a configured WandbLogger the run dir's persistent id and ``resume="allow"``."""
    node = (cfg.get("logger") or {}).get("wandb")
    if node is None:
        return
    with open_dict(node):
        node.id = node.get("id") or wandb_run_id(run_dir)
        node.resume = node.get("resume") or "allow"


def pin_ddp_children(output_dir: Path | str) -> None:
    """Make Lightning's re-launched DDP ranks run this job, in this job's directory.

    Lightning re-runs ``sys.argv`` plus ``hydra.run.dir=<HydraConfig run.dir>``: under ``-m`` the argv is
    the whole sweep (a nested multirun per rank), and the run.dir pattern is not this job's directory.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hc.overrides.task]
    with read_write(hc), open_dict(hc):
        hc.run.dir = str(output_dir)


@contextmanager
def job_environment():
    """Run one job; afterwards destroy its process group and restore os.environ."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
