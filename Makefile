# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install only when the package metadata changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/bnfold demo --out demo-out

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# torch is a peer in the bench only. On these machines torch==2.13.0 resolves to a local CPU wheel;
# elsewhere add --index-url https://download.pytorch.org/whl/cpu to avoid the multi-GB CUDA build.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m bench.bench_recalibrate --samples 512 --batch-size 64 --repeats 3
	$(BIN)/python -m bench.bench_fold

clean:
	rm -rf $(VENV) demo-out .pytest_cache
