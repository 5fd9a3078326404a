# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv when missing and install into it.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this pinned torch lies on the reference machine's disk; a GPU user
# sets TORCH_SPEC (e.g. `make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`).
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo demo-emoji test bench gpu-check install clean serve docs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ldmkit demo --out runs/demo

# The demo on real images: fetches the pinned emoji packages with npm (once, into
# runs/emoji-data), trains, judges, writes runs/emoji/report.md. See README "Real images".
demo-emoji: install
	$(VENV)/bin/ldmkit demo-emoji --out runs/emoji --data runs/emoji-data

# The API and web page over the demo's model (run `make demo` first): http://127.0.0.1:8000/
serve: install
	$(VENV)/bin/ldmkit serve --model runs/demo/model

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/run_all.py

# One command on a GPU machine: versions, U-Net step (eager, compiled) vs diffusers with MFU,
# sampling, the demo; writes benchmarks/results/gpu_check.json (BENCHMARKS.md, "GPU check").
gpu-check:
	benchmarks/gpu_check.sh

# docs/config-reference.md from the config dataclasses (a test fails when it is stale).
docs:
	$(if $(wildcard $(PY)),$(PY),python3) scripts/gen_config_reference.py

clean:
	rm -rf runs .pytest_cache
