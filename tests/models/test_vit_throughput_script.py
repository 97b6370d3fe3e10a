"""benchmarks/gpu_throughput.py: skips cleanly without CUDA, and its code path runs (CPU smoke, GPU for real)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU path")
def test_without_cuda_it_says_why_and_exits_0(bench, capsys):
    assert bench.main([]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out


def test_cpu_smoke_run_prints_the_table_and_counts_flops(bench, capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--device",
                "cpu",
                "--tiny",
                "--size",
                "32",
                "--batch-mae",
                "2",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--compile",
                "no",
                "--cases",
                "mae_vit_l8",
                "--peak-tflops",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "images/s" in text and "MFU" in text and "mae_vit_l8" in text
    (result,) = json.loads(out.read_text())["results"]
    assert result["images_per_s"] > 0 and result["gflops_per_image"] > 0 and 0 < result["mfu"] < 1


def test_mfu_uses_the_full_model_flops_on_meta_device(bench):
    """ViT-L/8 MAE at 256 px: ~0.7 TFLOP per image per training step (forward + backward), ResNet50 ~32 GFLOP."""
    args = bench.parse(["--fp32"])
    expected = {"mae_vit_l8": (650, 750), "resnet50": (30, 35)}
    for case, (low, high) in expected.items():
        flops = bench.count_flops(bench.CASES[case], args, torch.device("meta"), batch=2) / 2 / 1e9
        assert low < flops < high, (case, flops)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_benchmark_runs(bench, capsys):
    assert (
        bench.main(["--steps", "3", "--warmup", "2", "--compile", "no", "--batch-mae", "16", "--batch-resnet", "32"])
        == 0
    )
    assert "mae_vit_l8" in capsys.readouterr().out
