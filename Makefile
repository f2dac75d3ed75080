# Two set-up commands: `make run` (a local 3-node cluster) and `make test` (the whole suite).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
NODES ?= 3

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/leaderless up --nodes $(NODES)

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src/leaderless
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src/leaderless

bench: $(VENV)/.installed-test
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/membership.py

# Hostile input, longer: the fuzz package with 20x the examples, then each atheris
# harness for FUZZ_RUNS inputs (a crash stops it with libFuzzer's report and a crash file).
FUZZ_RUNS ?= 200000
.PHONY: fuzz
fuzz: $(VENV)/.installed-test
	$(BIN)/pip install -q -e '.[test,fuzz]'
	LEADERLESS_FUZZ_SCALE=20 $(BIN)/python -m pytest -q tests/fuzz
	$(BIN)/python tests/fuzz/atheris_native.py -runs=$(FUZZ_RUNS) -max_len=4096
	$(BIN)/python tests/fuzz/atheris_gossip.py -runs=$(FUZZ_RUNS) -max_len=2048

# Longer chaos runs: every workload under every fault kind on 5 nodes, for several seeds
# (the bounded run of `make test` is tests/chaos/test_chaos_run.py). Stops at the first
# invalid history; each run's history, faults and timeline are in $(CHAOS_OUT)/<workload>-<seed>.
CHAOS_SEEDS ?= 1 2 3
CHAOS_S ?= 60
CHAOS_OUT ?= chaos-out
.PHONY: chaos
chaos: $(VENV)/.installed-test
	@for seed in $(CHAOS_SEEDS); do for w in register set counter lock; do \
		$(BIN)/leaderless chaos --nodes 5 --workload $$w --nemesis all --duration $(CHAOS_S) \
			--seed $$seed --out $(CHAOS_OUT)/$$w-$$seed || exit 1; \
	done; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
