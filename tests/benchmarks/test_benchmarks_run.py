"""Each CPU benchmark runs in --quick mode and prints its table. No speed targets here: the
figures live in docs/PERFORMANCE.md (timed unit tests would be flaky on shared machines)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script, header", [
    ("encodings.py", "| encoding | bytes/sample |"),
    ("loader.py", "| workers | shard loader samples/s (1) float |"),
    ("step_overhead.py", "| loop | ms/step |"),
    ("scaling.py", "| sites | shards | writer samples/s |"),
    ("eval_cost.py", "| stage | "),
])
def test_script_runs_quick_and_prints_its_table(script, header):
    run = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert header in run.stdout, run.stdout[-3000:]
    assert "# machine:" in run.stdout
    table = run.stdout[run.stdout.index(header):].splitlines()
    assert len(table) >= 3 and all(line.startswith("|") for line in table[:3])
