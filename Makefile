# The two commands of the README, and what they need. `make demo` / `make test` on a fresh clone.
#
# torch is installed first, pinned to the CPU build that this machine kind carries on local disk,
# so that pip never pulls a multi-GB CUDA wheel for a CPU box. On a GPU machine, install the torch
# build that matches your CUDA first (or run `make setup TORCH=torch==2.13.0+cu128 ...`).

VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: setup setup-run demo test lint browser clean

# setup-run: torch and the package, what `seechat demo` needs; setup: that plus the dev extras
# (test tools, the server, the trackers), what `make test` needs. The demo does not wait for them.
setup-run: $(VENV)/.installed-run
setup: $(VENV)/.installed

$(VENV)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-run
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: setup-run
	$(BIN)/seechat demo

lint: setup
	$(BIN)/ruff check seechat tests benchmarks docs/experiments
	$(BIN)/ruff format --check seechat tests benchmarks docs/experiments

# Headless Chromium for the browser test of the chat page (Debian packages; needs root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: the browser test will be skipped"; fi; }

test: setup browser lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
