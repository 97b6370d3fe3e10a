"""Shared by the console entry points: user errors print one message, not a traceback."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from datetime import datetime
from typing import Any, Callable

from omegaconf import OmegaConf

from cellrep.errors import CellrepError

log = logging.getLogger("cellrep")


def _run_id() -> str:
    return uuid.uuid4().hex[:6]


def _run_leaf(run_name: str | None = None) -> str:
    """Where a run lives under outputs/<task>/: ``runs/<run_name>`` (stable, so re-running the same
    command finds and resumes it) or, unnamed, ``<date>/<time>_<id>`` (new every time)."""
    if run_name:
        return f"runs/{run_name}"
    return f"{datetime.now():%Y-%m-%d/%H-%M-%S}_{_run_id()}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("cellrep_run_id"):
        # Cached: every reference within one composed config sees the same id.
        OmegaConf.register_new_resolver("cellrep_run_id", _run_id, use_cache=True)
    if not OmegaConf.has_resolver("cellrep_cwd"):
        # Unlike ${hydra:runtime.cwd}, usable before Hydra is set up (a multirun's sweep dir).
        OmegaConf.register_new_resolver("cellrep_cwd", os.getcwd)
    if not OmegaConf.has_resolver("cellrep_run_leaf"):
        OmegaConf.register_new_resolver("cellrep_run_leaf", _run_leaf, use_cache=True)


def exit_on_user_error(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn``; a :class:`CellrepError` prints its message and exits with status 2."""
    try:
        return fn(*args)
    except CellrepError as exc:
        print(f"\ncellrep: error: {exc}", file=sys.stderr)
        if os.environ.get("CELLREP_TRACEBACK"):
            raise
        sys.exit(2)
