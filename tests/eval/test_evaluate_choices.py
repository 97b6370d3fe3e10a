"""Which block and which data cellrep-eval uses: ``block=<name>``, ``block=best probe_results=<probe.json>``,
and ``use_run_config`` when no ``config.yaml`` lies next to the checkpoint (the documented fallback:
the command line's data/split, with a warning; docs/benchmarks.md)."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from cellrep.cli.evaluate import evaluate
from cellrep.errors import CellrepError
from cellrep.eval.checkpoint import eval_data_config, run_config_path
from cellrep.eval.features import block_names, pooled_block_features
from cellrep.eval.pipeline import best_block_from_file
from cellrep.models.checkpoint import load_backbone

QUIET = ("progress=false", "loader.num_workers=0", "plots.umap=false")  # UMAP has its own tests
ONLY_EMBED = ("benchmarks=[]", "corrections=[none]")  # the block choice is the point here, not the benchmarks
BLOCK = "act1"  # the stem: the cheapest pass, and not what block=last would give


@pytest.fixture(scope="module")
def by_name(checkpoint, compose_cfg, tmp_path_factory, shared_data_dir):
    root = tmp_path_factory.mktemp("eval_by_name")
    cfg = compose_cfg("eval", [*QUIET, *ONLY_EMBED, f"ckpt_path={checkpoint}", f"block={BLOCK}"], root, shared_data_dir)
    return evaluate(cfg), root / "run"


def test_block_by_name_embeds_that_block(by_name, checkpoint):
    metrics, run = by_name
    backbone, meta = load_backbone(checkpoint)
    assert BLOCK in block_names(backbone) and BLOCK != block_names(backbone)[-1]
    (stem,) = pooled_block_features(backbone, torch.zeros(1, meta["in_chans"], 32, 32), [0])
    wells = pd.read_parquet(run / "embeddings.parquet")
    assert metrics["block"] == BLOCK and "probe" not in metrics  # no probe trained to pick it
    assert metrics["features"] == stem.shape[1] == sum(c.startswith("feature_") for c in wells.columns)
    assert json.loads((run / "metrics.json").read_text())["block"] == BLOCK


def test_probe_results_give_the_block_without_probing_again(by_name, eval_cfg, checkpoint, tmp_path):
    probe = tmp_path / "probe.json"  # what cellrep-probe writes, as far as cellrep-eval reads it
    probe.write_text(json.dumps({"best_block": BLOCK, "blocks": []}))
    metrics = evaluate(eval_cfg("eval", *ONLY_EMBED, f"ckpt_path={checkpoint}", "block=best", f"probe_results={probe}"))
    assert metrics["block"] == BLOCK and "probe" not in metrics
    assert not (tmp_path / "run" / "probe.csv").exists()
    pd.testing.assert_frame_equal(  # exactly the embeddings of block=<that name>
        pd.read_parquet(tmp_path / "run" / "embeddings.parquet"), pd.read_parquet(by_name[1] / "embeddings.parquet")
    )


def test_unreadable_probe_results_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "probe.json").write_text(json.dumps({"blocks": []}))
    for path in (tmp_path / "probe.json", tmp_path / "missing.json"):
        with pytest.raises(CellrepError, match="cannot read the best block") as err:
            best_block_from_file(path)
        assert str(path) in str(err.value) and "probe_results=<run>/probe.json" in err.value.fix


def test_without_a_run_config_next_to_the_checkpoint_the_command_line_data_is_used(
    eval_cfg, checkpoint, tmp_path, caplog
):
    trained = OmegaConf.load(run_config_path(checkpoint))  # the session run's config.yaml
    lone = tmp_path / "copied" / "checkpoints" / "last.ckpt"  # a checkpoint copied without its run dir
    lone.parent.mkdir(parents=True)
    lone.write_bytes(checkpoint.read_bytes())
    modules = trained.data.synthetic.num_modules + 1  # a screen other than the training run's
    with caplog.at_level(logging.WARNING, logger="cellrep.eval.checkpoint"):
        data, split, seed, source = eval_data_config(
            eval_cfg("eval", f"ckpt_path={lone}", f"data.synthetic.num_modules={modules}", "split=random", "seed=7")
        )
    assert source == "command line" and (data.synthetic.num_modules, str(split.name), seed) == (modules, "random", 7)
    assert f"no training config at {lone.parent.parent / 'config.yaml'}" in caplog.text
    # next to the session's checkpoint there is one: its data and split win over the command line
    data, split, seed, source = eval_data_config(
        eval_cfg("eval", f"ckpt_path={checkpoint}", f"data.synthetic.num_modules={modules}", "split=random")
    )
    assert source == str(run_config_path(checkpoint))
    assert (data.synthetic.num_modules, str(split.name), seed) == (
        trained.data.synthetic.num_modules,
        str(trained.split.name),
        trained.seed,
    )
