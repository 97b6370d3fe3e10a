"""One tiny model trained once per session, on a synthetic screen sized so the benchmarks can see biology.

The screen is the tiny debug screen with more modules, experiments and control
wells: recall needs enough annotated pairs to differ from chance, TVN needs
control wells in every experiment, and the gene averages need replicates. It is
plated RxRx1-style (4 plates per experiment, each holding one of 4 disjoint gene
groups, module mates on different plates, a systematic plate-slot shift), so raw
embeddings confuse plate slot with biology and batch correction has work to do.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

SCREEN = (
    "data.synthetic.num_modules=8",
    "data.synthetic.genes_per_module=6",
    "data.synthetic.experiments_per_cell_type=4",
    "data.synthetic.control_wells_per_plate=12",
    "data.synthetic.num_compounds=6",
    "data.synthetic.plates_per_experiment=4",
    "data.synthetic.gene_groups=4",
    "data.synthetic.module_similarity=0.85",
)
TRAIN = (
    "debug=tiny",
    "logger=csv",
    "model.name=resnet10t",
    "trainer.max_epochs=10",
    "test=false",
    "+callbacks.model_checkpoint.every_n_epochs=10",
    *SCREEN,
)


def compose_in(config_name: str, overrides, root, data_dir):
    """Like tests/conftest.compose_config (a session fixture cannot use the function-scoped make_cfg)."""
    GlobalHydra.instance().clear()
    paths = [f"paths.root_dir={root}", f"paths.output_dir={root}/run", f"paths.data_dir={data_dir}"]
    with initialize_config_module(config_module="cellrep.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=[*paths, *overrides])


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Small tensors on 2 shared cores: one intra-op thread avoids spin-waiting between threads
    (measured: a ResNet step ran >10x slower with 2 threads when the cores were busy). Module scope:
    restored after each module here, so tests elsewhere keep their thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shared_data_dir):
    """Run directory of a tiny trained model: checkpoints/last.ckpt and config.yaml."""
    from cellrep.cli.train import train

    root = tmp_path_factory.mktemp("trained")
    train(compose_in("train", list(TRAIN), root, shared_data_dir))
    return root / "run"


@pytest.fixture(scope="session")
def checkpoint(trained_run):
    return trained_run / "checkpoints" / "last.ckpt"


QUIET = ("progress=false", "loader.num_workers=0")


@pytest.fixture(scope="session")
def compose_cfg():
    """compose(config_name, overrides, root, data_dir) for fixtures wider than a test."""
    return compose_in


@pytest.fixture
def eval_cfg(tmp_path, shared_data_dir):
    def _make(config_name: str, *overrides: str):
        return compose_in(config_name, [*QUIET, *overrides], tmp_path, shared_data_dir)

    return _make
