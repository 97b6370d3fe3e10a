"""What every run directory holds besides checkpoints and logger files:
the resolved config, the code version, and the final metrics."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import cellrep
from cellrep.errors import CellrepError
from cellrep.io import atomic_write_json, atomic_write_text


def code_version() -> dict[str, Any]:
    """The git commit of the cellrep source tree (and whether it had local edits)."""
    src = Path(cellrep.__file__).resolve().parent
    info: dict[str, Any] = {"cellrep_version": cellrep.__version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=src,
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / "metrics.json").exists():
            raise CellrepError(
                f"run directory {self.path} already holds a finished run",
                fix="start a new run (the default run dir is unique) instead of reusing this one",
            )

    def write_provenance(self, cfg: DictConfig) -> dict[str, Any]:
        """config.yaml (resolved) and version.json (git commit); returns the version info for the loggers."""
        atomic_write_text(self.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        version = code_version()
        atomic_write_json(self.path / "version.json", version)
        return version

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        return atomic_write_json(self.path / "metrics.json", metrics, overwrite=False)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"
