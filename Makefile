# Two commands a user needs: `make demo` (a small SparseK model end to end) and `make test`.
# Both create .venv with Python 3.12 on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# python3.12 from PATH, else from pyenv's versions directory.
PYTHON312 ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1 && echo python3.12 || ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)

.PHONY: demo tour retrofit test venv clean

# jax_triton imports only where jax's CUDA plugin is installed; lowering for CUDA without a GPU needs just its
# Python module (not its runtime), kept apart so that plain `import jax` does not look for a GPU
# (tests/test_triton.py puts it on the path of the process that lowers).
$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then echo "error: Python 3.12 not found (put python3.12 on PATH or set PYTHON312=/path/to/python3.12)" >&2; exit 1; fi
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/jax-cuda-plugin jax-cuda12-plugin==0.11.2
	touch $@

venv: $(VENV)/.installed

# A small SparseK model end to end: data (State of the Union corpus, offline), training, evaluation,
# generation and the loss plot. Rerunning resumes from the newest checkpoint.
demo: venv
	$(VENV)/bin/sparsek-train configs/demo.yaml
	$(VENV)/bin/sparsek-eval configs/demo.yaml checkpoint=runs/demo
	$(VENV)/bin/sparsek-generate configs/demo.yaml checkpoint=runs/demo prompt="The state of the Union is"
	$(VENV)/bin/sparsek-plot runs/demo
	@echo "outputs in runs/demo: metrics.jsonl, loss.png, eval.json, checkpoints/, config.yaml"

# A tour of the operator and the attention (prints, and plots the selection pattern).
tour: venv
	$(PY) -m sparsek_train.tour --out runs/tour

# A dense demo model converted to SparseK and fine-tuned; held-out loss by position before and after
# (docs/results.md).
retrofit: venv
	$(PY) -m benchmarks.retrofit_demo

# Work stealing: a worker that runs out of tests takes queued ones from the other, so a few long tests do not
# leave one core idle at the end.
test: venv
	$(PY) -m pytest -n 2 --dist worksteal -m "not gpu and not tpu" --durations=12 tests

clean:
	rm -rf $(VENV) runs
