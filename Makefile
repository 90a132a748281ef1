# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The venv is (re)installed only when pyproject.toml or the constraints change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench gpu-check clean-venv

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# Bytecode is cached even where the environment says PYTHONDONTWRITEBYTECODE: every xdist worker, nested
# pytest and CLI subprocess otherwise recompiles the project and re-rewrites the test files (~3 s a worker).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -n 2 --dist loadfile

# mypy: mae_deploy/ with pyproject's [tool.mypy]; ~25 s cold, under 2 s from its cache (.mypy_cache).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# On a CUDA machine (no network): tests/gpu, then the GPU benchmarks; one table -> benchmarks/RESULTS.md.
# Uses the Python on PATH (a GPU image's own CUDA torch), not .venv: pip install --no-deps -e . there first.
gpu-check:
	scripts/gpu_check.sh

clean-venv:
	rm -rf $(VENV)

# The export tests again on the oldest versions pyproject declares (constraints-compat.txt), in a second venv
# installed the same way; CI runs it after `make test`. Not the whole suite: the export stack is what the
# old versions change, and the job stays around a minute. test_export_classifier.py imports torchvision,
# which does not load beside the CPU torch 2.13 (see constraints-compat.txt).
COMPAT_VENV  := .venv-compat
COMPAT_PY    := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TESTS := tests/export/test_export.py tests/export/test_qdq.py tests/export/test_fp16_compat.py

.PHONY: compat

$(COMPAT_STAMP): pyproject.toml constraints-compat.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q -c constraints-compat.txt -e '.[cpu,export]' pytest pytest-xdist
	touch $(COMPAT_STAMP)

compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m pip list 2>/dev/null | grep -E '^(torch|onnx|onnxscript|onnx-ir|onnxruntime) '
	env -u PYTHONDONTWRITEBYTECODE $(COMPAT_PY) -m pytest -q -n 2 --dist loadfile $(COMPAT_TESTS)
