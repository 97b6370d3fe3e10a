"""cellrep-mission end to end on the tiny screen: two training arms, the probe, every benchmark, one report."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from cellrep.cli.mission import mission
from cellrep.errors import CellrepError

TRAIN = '["debug=tiny","trainer.max_epochs=1","trainer.log_every_n_steps=1","model.name=resnet10t","logger=csv"]'
EVAL = (
    '["block=best","probe.epochs=5","probe.lrs=[0.001,0.01]","loader.num_workers=0",'
    '"corrections=[none,pca_centerscale,tvn]","benchmarks=[recall,consistency,dti,classification]"]'
)
NUMBER = r"\d+\.\d{3}"


def compose_in(overrides, root, data_dir):
    """Like tests/conftest.compose_config (a module fixture cannot use the function-scoped make_cfg)."""
    GlobalHydra.instance().clear()
    paths = [f"paths.root_dir={root}", f"paths.output_dir={root}/run", f"paths.data_dir={data_dir}"]
    with initialize_config_module(config_module="cellrep.conf", version_base="1.3"):
        return compose(config_name="mission", overrides=[*paths, *overrides])


def channels(run) -> int:
    return len(OmegaConf.load(run / "train_batch" / "config.yaml").data.synthetic.channel_names)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_data_dir):
    """One mission for the module (~40 s on 2 cores): every test reads its outputs."""
    root = tmp_path_factory.mktemp("mission")
    cfg = compose_in([f"train={TRAIN}", f"eval={EVAL}", "progress=false"], root, shared_data_dir)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: see tests/conftest.py one_torch_thread
    try:
        metrics = mission(cfg)
    finally:
        torch.set_num_threads(before)
    return cfg, metrics, root / "run"


def test_the_report_opens_with_the_three_comparisons_in_numbers(finished):
    _, metrics, run = finished
    lines = (run / "report.md").read_text().splitlines()
    assert lines[0].startswith("# cellrep mission: resnet10t on synthetic")
    head = lines[2 : lines.index("", 2)]
    sources = sorted(metrics["comparisons"]["recall"])
    assert len(head) == 2 + len(sources) and "StringDB" in sources  # accuracy, one line per source, DTI
    assert re.fullmatch(
        rf"- held-out top-1 by split: batch \(held-out experiments\) {NUMBER}, random \(random sites of every "
        rf"experiment\) {NUMBER}; chance {NUMBER}",
        head[0],
    ), head[0]
    stringdb = head[1 + sources.index("StringDB")]
    assert re.fullmatch(
        rf"- recall StringDB at 0\.05/0\.95 \(\d+ pairs\): raw {NUMBER} vs pca_centerscale {NUMBER} vs tvn "
        rf"{NUMBER}; random 0\.100",
        stringdb,
    ), stringdb
    assert re.fullmatch(
        rf"- zero-shot DTI median AP \(\d+ compounds, max over doses\): raw {NUMBER} vs random {NUMBER}, "
        rf"pca_centerscale {NUMBER} vs random {NUMBER}, tvn {NUMBER} vs random {NUMBER}",
        head[-1],
    ), head[-1]
    tvn = metrics["comparisons"]["recall"]["StringDB"]["0.05/0.95"]["tvn"]
    assert stringdb.split(" vs tvn ")[1].startswith(f"{tvn:.3f};")
    acc = metrics["comparisons"]["accuracy"]["arms"]
    assert f"batch (held-out experiments) {acc['batch']['top1']:.3f}" in head[0]


def test_the_report_holds_the_probe_table_with_the_baseline_and_every_benchmark(finished):
    _, metrics, run = finished
    report = (run / "report.md").read_text()
    blocks = [b["block"] for b in metrics["probe"]["blocks"]]
    assert len(blocks) >= 4 and metrics["block"] == metrics["probe"]["best_block"] in blocks
    for block in blocks:
        assert re.search(rf"^\| (\*\*)?{block}(\*\*)? \| \d+ \|", report, re.M), block
    assert re.search(
        rf"^\| intensity statistics \(baseline\) \| {2 * channels(run)} \| [0-9.e-]+ \| {NUMBER} \| {NUMBER} \|",
        report,
        re.M,
    )
    assert "| benchmark | raw | pca_centerscale | tvn | baseline |" in report
    for row in (
        "recall StringDB at 0.1/0.9",
        "consistency: share with p<0.05",
        "DTI median AP",
        "classification top-1",
    ):
        assert re.search(rf"^\| {re.escape(row)}.*\| {NUMBER} \| {NUMBER} \| {NUMBER} \|", report, re.M), row
    for plot in ("comparisons.png", "eval/probe.png", "eval/recall.png", "eval/dti.png"):
        assert f"]({plot})" in report and (run / plot).stat().st_size > 0


def test_metrics_json_holds_every_comparison(finished):
    _, metrics, run = finished
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    acc = saved["comparisons"]["accuracy"]
    assert {"batch", "random"} == set(acc["arms"]) and 0 < acc["chance"] < 1
    for arm in ("batch", "random"):
        assert 0 <= acc["arms"][arm]["top1"] <= 1 and saved["arms"][arm]["split"] == arm
    recall = saved["comparisons"]["recall"]["StringDB"]["0.05/0.95"]
    assert set(recall) == {"none", "pca_centerscale", "tvn", "random"} and recall["random"] == pytest.approx(0.1)
    dti = saved["comparisons"]["dti"]
    assert set(dti) == {"none", "pca_centerscale", "tvn"}
    assert all(0 <= d["ap"] <= 1 and 0 <= d["random_ap"] <= 1 and d["n_compounds"] > 0 for d in dti.values())
    base = saved["baseline"]["intensity"]
    assert (
        base["dim"] == 2 * channels(run)
        and 0 <= base["test_acc"] <= 1
        and base["chance"] == pytest.approx(saved["probe"]["blocks"][0]["chance"])
    )
    assert saved["test/acc"] == acc["arms"]["batch"]["top1"]  # what a multirun summary prints per job
    assert set(saved["seconds"]) >= {"train_batch", "train_random", "eval", "baseline", "total"}


def test_every_step_has_its_own_directory_inside_the_mission(finished):
    _, metrics, run = finished
    assert metrics["runs"] == {
        "batch": str(run / "train_batch"),
        "random": str(run / "train_random"),
        "eval": str(run / "eval"),
    }
    for sub in ("train_batch", "train_random", "eval"):
        assert (run / sub / "metrics.json").is_file() and (run / sub / "config.yaml").is_file()
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluated["checkpoint"].startswith(str(run / "train_batch" / "checkpoints"))
    assert OmegaConf.load(run / "train_random" / "config.yaml").split.name == "random"
    assert (run / "config.yaml").is_file() and (run / "version.json").is_file()


def test_a_finished_mission_is_never_overwritten(finished):
    cfg, _, run = finished
    before = (run / "report.md").read_text()
    with pytest.raises(CellrepError, match="already holds a finished run"):
        mission(cfg)
    assert (run / "report.md").read_text() == before


def test_mistakes_in_the_mission_settings_fail_before_any_work(make_cfg, tmp_path):
    with pytest.raises(CellrepError, match="evaluate_arm=nope"):
        mission(make_cfg("evaluate_arm=nope", config_name="mission"))
    with pytest.raises(CellrepError, match="list of override strings"):
        mission(make_cfg("train=3", config_name="mission"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", ["/data/my screen/a=b,c", "/data/it's"])
def test_step_paths_stay_one_value_whatever_they_hold(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cellrep.cli.mission import quote

    assert OverridesParser.create().parse_override(f"paths.root_dir={quote(path)}").value() == path
