# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# CPU installs pin torch so pip never pulls a CUDA build.
INSTALL := $(PIP) install -q -c constraints-cpu.txt

.PHONY: install demo test bench

install:
	$(INSTALL) torch==2.13.0
	$(INSTALL) -e ".[dev]"

# Generate the synthetic screen (cached), shard it, train on held-out experiments
# and on a random split, and print both accuracies side by side.
demo: install
	cellrep-train -m split=batch,random

test: install
	$(PYTHON) -m pytest -q
