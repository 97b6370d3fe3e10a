"""Each CPU benchmark runs in --quick mode and prints its table. No speed targets here: the
figures live in docs/PERFORMANCE.md (timed unit tests would be flaky on shared machines)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize(
    "script, header",
    [
        ("encodings.py", "| encoding | bytes/sample |"),
        ("loader.py", "| workers | shard loader samples/s (1) float |"),
        ("step_overhead.py", "| loop | ms/step |"),
        ("scaling.py", "| sites | shards | writer samples/s |"),
        ("eval_cost.py", "| stage | "),
    ],
)
def test_script_runs_quick_and_prints_its_table(script, header):
    run = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert header in run.stdout, run.stdout[-3000:]
    assert "# machine:" in run.stdout
    table = run.stdout[run.stdout.index(header) :].splitlines()
    assert len(table) >= 3 and all(line.startswith("|") for line in table[:3])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would measure for minutes")
def test_gpu_session_script_says_there_is_no_gpu_and_exits_0(tmp_path):
    run = subprocess.run(
        ["bash", str(BENCH / "gpu_session.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OUT": str(tmp_path / "out")},
    )
    assert run.returncode == 0 and "no CUDA device" in run.stdout, run.stderr
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written
