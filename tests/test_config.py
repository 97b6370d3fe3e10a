"""Every config group composes; bad overrides fail at compose time with a clear message."""

from __future__ import annotations

from importlib import resources

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from cellrep.config import to_schema
from cellrep.errors import CellrepError

CONF = resources.files("cellrep") / "conf"


def options(group: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in (CONF / group).iterdir() if p.name.endswith(".yaml"))


def test_every_group_is_shipped():
    for group in ("data", "split", "model", "task", "trainer", "logger", "callbacks", "paths", "experiment", "debug"):
        assert options(group), f"config group {group}/ is empty"


@pytest.mark.parametrize(
    "group", ["data", "split", "model", "task", "trainer", "logger", "callbacks", "paths", "debug"]
)
def test_each_option_composes_and_validates(make_cfg, group):
    extra = {"data": ["data.root=/x"], "split": ["split.holdout=RPE"]}.get(group, [])
    for option in options(group):
        cfg = make_cfg(f"{group}={option}", *extra)
        assert cfg[group] is not None if group in cfg else True
        to_schema(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}", "data.root=/data/x")
    to_schema(cfg)


def test_shard_config_composes(make_cfg):
    cfg = make_cfg(config_name="shard")
    assert cfg.data.source.name == "synthetic"


def test_unknown_key_fails_at_compose_time(make_cfg):
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="crop_szie"):
        make_cfg("data.crop_szie=32")


def test_wrong_type_fails_at_compose_time(make_cfg):
    with pytest.raises(ConfigCompositionException, match="batch_size"):
        make_cfg("data.batch_size=lots")


def test_unknown_enum_value_fails_at_compose_time(make_cfg):
    with pytest.raises(ConfigCompositionException, match="normalization"):
        make_cfg("data.normalization=per_well")


def test_unknown_model_fails_before_anything_runs(make_cfg):
    cfg = make_cfg("model.name=resnet5o")
    with pytest.raises(CellrepError, match="(?s)unknown model 'resnet5o'.*did you mean resnet50"):
        to_schema(cfg)


def test_cell_type_split_needs_a_holdout(make_cfg):
    cfg = make_cfg("split=cell_type")
    with pytest.raises(CellrepError, match="split.holdout"):
        to_schema(cfg)
