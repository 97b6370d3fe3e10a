# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# CPU installs pin torch so pip never pulls a CUDA build.
INSTALL := $(PIP) install -q -c constraints-cpu.txt

.PHONY: install demo lint format test bench

install:
	$(INSTALL) torch==2.13.0
	$(INSTALL) -e ".[dev,sweeps,harmony]"

# The main job (cellrep-mission, conf/mission.yaml): generate the synthetic screen (cached), shard it,
# train on held-out experiments and on a random split, probe every block, embed with the best one,
# batch-correct, run every benchmark, write one report (outputs/mission/<date>/<time>_<id>/report.md).
# The demo budget (conf/mission.yaml `train`): resnet10t, 10 epochs per training arm.
demo: install
	cellrep-mission

# ruff (lint + format, pyproject [tool.ruff]) and the layer rules (pyproject [tool.importlinter],
# docs/architecture.md); `make format` applies ruff's fixes.
lint:
	ruff check .
	ruff format --check .
	lint-imports

format:
	ruff check --fix .
	ruff format .

# Test files are spread over TEST_WORKERS processes (pytest-xdist; one file stays on one process, so its
# module fixtures are built once); each test runs on one OpenMP thread (tests/conftest.py). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: install lint
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# CPU benchmarks (docs/PERFORMANCE.md, issue 7): prints the tables of docs/PERFORMANCE.md. Target: < 10 min on an
# idle 2-core machine; measured 5.6 min at load 3-6 on 2 shared cores (4 min CPU time), per-script
# times in docs/PERFORMANCE.md. Add QUICK=--quick for a ~1 min smoke run.
# The GPU script is separate: benchmarks/gpu_throughput.py.
QUICK ?=
bench:
	$(PYTHON) benchmarks/encodings.py $(QUICK)
	$(PYTHON) benchmarks/loader.py $(QUICK)
	$(PYTHON) benchmarks/step_overhead.py $(QUICK)
	$(PYTHON) benchmarks/scaling.py $(QUICK)
	$(PYTHON) benchmarks/eval_cost.py $(QUICK)
