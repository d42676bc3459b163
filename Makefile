# The two commands: `make demo` (the main job on the embedded default) and `make test` (import contracts, then pytest).
# Both create or reuse .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Single-machine runs keep every Ray connection on 127.0.0.1 (see docs/ray-notes in shared/).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "echo-ssl needs Python 3.11 or newer; set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

demo: venv
	$(BIN)/echo-ssl demo

# lint-imports: the import-linter contracts in pyproject.toml (layers from the CLI down to storage).
test: venv
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

clean:
	rm -rf demo-data demo-out mlflow.db mlruns
