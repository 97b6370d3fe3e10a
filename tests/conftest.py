"""Shared fixtures: compose configs the way the entry points do, inside tmp dirs."""

from __future__ import annotations

import os

# One OpenMP/BLAS thread for the whole suite and every process it starts, set before torch and numpy load:
# tiny models run no faster on two threads, and the trained fixtures (so the science checks) then come out
# the same on any machine. Measured: tests/eval's session model recalls StringDB pairs after TVN at 0.592
# with OMP_NUM_THREADS=1 and 0.517 without it on this 2-core VM (torch.set_num_threads(1) alone is not enough).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cellrep  # noqa: F401, E402

# isort: split
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from cellrep.cli.common import register_resolvers
from cellrep.config import register_configs

register_configs()
register_resolvers()


@pytest.fixture(autouse=True)
def _isolate_home(tmp_path_factory, monkeypatch):
    """Keep wandb, caches and outputs of every test inside tmp dirs."""
    home = tmp_path_factory.mktemp("home")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MPLBACKEND", "Agg")


def compose_config(config_name: str, overrides: list[str], root: Path, data_dir: Path | None = None):
    """Compose like ``hydra.main`` does, with every path under ``root``."""
    GlobalHydra.instance().clear()
    paths = [f"paths.root_dir={root}", f"paths.output_dir={root}/run"]
    if data_dir is not None:
        paths.append(f"paths.data_dir={data_dir}")
    with initialize_config_module(config_module="cellrep.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*paths, *overrides])
    return cfg


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory):
    """One data cache for the session: synthetic screens are generated once per spec."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path, shared_data_dir):
    def _make(*overrides: str, config_name: str = "train"):
        return compose_config(config_name, list(overrides), tmp_path, shared_data_dir)

    return _make


@pytest.fixture
def one_torch_thread():
    """Tiny models: one intra-op thread beats two (no OpenMP hand-offs), by 10× on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
