# `make test` installs (once; install.sh keeps a stamp) and runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test bench tiny clean

install:
	bash install.sh

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m benchmarks.packing --config configs/benchmark_packing.yaml

tiny: install
	$(PY) -m models.tiny out/tiny

clean:
	rm -rf out .pytest_cache
