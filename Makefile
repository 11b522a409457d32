# The two set-up commands of the README. Both create .venv on first use (scripts/setup_venv.sh).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup serve test lint clean

setup:
	@bash scripts/setup_venv.sh

# Starts the default deployment (SmolLM2-135M-Instruct, 2 pipeline stages, one machine),
# answers a smoke prompt to show the whole path works, then serves until Ctrl-C.
serve: setup
	$(VENV)/bin/conveyor serve

# Lint first (pyflakes: unused imports, undefined names), then every test.
test: lint
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
