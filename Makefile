# latentcrafter: set-up, demo and tests. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
# Override for GPU machines, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-deps lint format clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@if $(BIN)/python -m pip list 2>/dev/null | grep -qi nvidia; then \
		echo "CUDA packages were pulled into $(VENV); check TORCH_SPEC and dependency pins" >&2; \
		[ -n "$(ALLOW_CUDA)" ] || exit 1; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pipelines.tools.demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# tests/pipelines/job/test_ray_submit.py runs `ray up/submit/down` over SSH on 127.0.0.1: sshd and rsync.
test-deps:
	@if ! command -v rsync >/dev/null 2>&1 || { ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; }; then \
		if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing openssh-server and rsync (the ray submit test needs them)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync >/dev/null; \
		else \
			echo "the tests need sshd and rsync: run 'sudo apt-get install -y openssh-server rsync', then make test" >&2; \
			exit 1; \
		fi; \
	fi

test: lint test-deps
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
	@echo "see BENCHMARKS.md for each benchmark's command"

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache build *.egg-info
