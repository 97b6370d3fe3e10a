"""Every config group composes; bad overrides fail at compose time, or in to_schema before any data is made."""

from __future__ import annotations

import dataclasses
import enum
import typing
from importlib import resources

import pytest
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from cellrep import config
from cellrep.config import to_schema
from cellrep.data.loading.splits import SPLITS
from cellrep.data.loading.transforms import NORMALIZATIONS
from cellrep.data.shards.prepare import SOURCES
from cellrep.data.sources.tiff_pixels import RULES
from cellrep.data.sources.tiff_plates import LAYOUTS
from cellrep.errors import CellrepError

CONF = resources.files("cellrep") / "conf"
SCHEMAS = {
    "data": (config.DataConfig,),
    "split": (config.SplitConfig,),
    "model": (config.ModelConfig,),
    "task": (config.TaskConfig, config.MAETaskConfig, config.DINOTaskConfig, config.SimCLRTaskConfig),
    "trainer": (config.TrainerConfig,),
    "paths": (config.PathsConfig,),
}
# what an option needs to validate: a dataset folder, a held-out cell type, a ViT for the MAE
EXTRA = {"data": ["data.root=/x"], "split": ["split.holdout=RPE"], "task": ["model=vit_s16"]}


def options(group: str) -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in (CONF / group).iterdir() if p.name.endswith(".yaml"))


def test_every_group_is_shipped():
    for group in ("data", "split", "model", "task", "trainer", "logger", "callbacks", "paths", "experiment", "debug"):
        assert options(group), f"config group {group}/ is empty"


@pytest.mark.parametrize(
    "group", ["data", "split", "model", "task", "trainer", "logger", "callbacks", "paths", "debug"]
)
def test_each_option_composes_and_validates(make_cfg, group):
    extra = EXTRA.get(group, [])
    default = make_cfg(*extra)
    composed = {}
    for option in options(group):
        cfg = make_cfg(f"{group}={option}", *extra)
        if group == "debug":  # @package _global_: it changes other groups
            assert cfg != default, f"debug={option} changes nothing"
        else:
            composed[option] = OmegaConf.to_yaml(cfg[group])
        if group in SCHEMAS:  # the group's YAML pulled in its schema
            assert OmegaConf.get_type(cfg, group) in SCHEMAS[group], option
        to_schema(cfg)
    assert len(set(composed.values())) == len(composed), f"two {group}/ options compose to the same config"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(make_cfg, experiment):
    to_schema(make_cfg(f"experiment={experiment}", "data.root=/data/x"))


def test_shard_config_composes(make_cfg):
    cfg = make_cfg(config_name="shard")
    assert cfg.data.source == "synthetic"
    assert to_schema(cfg)["data"].source == "synthetic"


def test_schemas_hold_no_enums():
    """Config values are the plain strings the code compares against: nothing to unwrap."""

    def enums(cls, seen=()):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            for t in (hint, *typing.get_args(hint)):
                if isinstance(t, type) and issubclass(t, enum.Enum):
                    yield f"{cls.__name__}.{f.name}"
                if dataclasses.is_dataclass(t) and t not in seen:
                    yield from enums(t, (*seen, cls))

    found = [name for schemas in SCHEMAS.values() for cls in schemas for name in enums(cls)]
    found += list(enums(config.EvalRunConfig))
    assert found == []


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.crop_szie=32", "crop_szie"),  # an unknown key
        ("data.unknown_key=1", "unknown_key"),
        ("data.batch_size=lots", "batch_size"),  # a wrong type
        ("model.drop_path_rate=abc", "drop_path_rate"),
        ("split.shots=many", "shots"),
    ],
)
def test_bad_override_fails_at_compose_time(make_cfg, override, match):
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match=match):
        make_cfg(override)


@pytest.mark.parametrize(
    "overrides, bad, allowed",
    [
        (["data.normalization=per_well"], "per_well", NORMALIZATIONS),
        (["split.name=plate"], "plate", SPLITS),
        (["data.source=png"], "png", SOURCES),
        (["data.bit_depth_rule=round"], "round", RULES),
        (["data=tiff", "data.root=/x", "data.pattern=p", "data.tiff.layout=zip"], "zip", LAYOUTS),
    ],
)
def test_unknown_value_names_the_allowed_ones(make_cfg, overrides, bad, allowed):
    cfg = make_cfg(*overrides)
    with pytest.raises(CellrepError) as err:
        to_schema(cfg)
    assert bad in err.value.problem
    assert all(value in err.value.fix for value in allowed), err.value.fix


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.batch_size=-4"], r"data.batch_size=-4.*\n.*fix: use data.batch_size >= 1"),
        (
            ["task=mae", "model=resnet18"],
            r"task=mae cannot use model resnet18.*\n.*fix: MAE and DINO need a ViT: model=vit_s16",
        ),
        (["task=mae", "model=vit_s16", "data.crop_size=40"], r"not a multiple of .* patch size 16.*\n.*multiple of 16"),
        (["data.num_workers=-1"], r"data.num_workers=-1.*\n.*fix: use data.num_workers >= 0"),
        (["data.crop_size=0"], r"data.crop_size=0.*\n.*fix: use data.crop_size >= 1"),
        (["data.normalization=per_well"], r"unknown normalization 'per_well'"),
        (["split.test_fraction=1.5"], r"split fractions out of range.*\n.*fix: use 0 < split.test_fraction < 1"),
        (["task.optimizer.base_lr=-1e-3"], r"base_lr=-0.001.*\n.*fix: use task.optimizer.base_lr >= 0"),
        (["model.drop_path_rate=1.5"], r"drop_path_rate=1.5 is not in \[0, 1\)"),
    ],
)
def test_bad_values_fail_before_any_data_is_generated(make_cfg, tmp_path, overrides, match):
    from cellrep.cli.train import train

    root = tmp_path / "synthetic"
    cfg = make_cfg(f"data.root={root}", *overrides)
    with pytest.raises(CellrepError, match=match):
        train(cfg)
    assert not root.exists(), "the screen was generated before the config was checked"


def test_unknown_model_fails_before_anything_runs(make_cfg):
    cfg = make_cfg("model.name=resnet5o")
    with pytest.raises(CellrepError, match="(?s)unknown model 'resnet5o'.*did you mean resnet50"):
        to_schema(cfg)


def test_cell_type_split_needs_a_holdout(make_cfg):
    cfg = make_cfg("split=cell_type")
    with pytest.raises(CellrepError, match="split.holdout"):
        to_schema(cfg)


def test_schemas_are_not_offered_as_group_options():
    """``--help`` lists each group's options; a schema is no option (and no group of its own)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="cellrep.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = [g for g in loader.list_groups("") if g != "hydra"]
        listed = {g: sorted(loader.get_group_options(g)) for g in groups}
    GlobalHydra.instance().clear()
    assert not [g for g in groups if g.startswith("schema")]
    for group in ("data", "split", "model", "task", "trainer", "paths", "benchmarks"):
        assert listed[group] == options(group), group
    assert not [f"{g}/{o}" for g, opts in listed.items() for o in opts if o.startswith("schema")]
