# Set-up and entry points. `make demo` and `make test` create .venv on first use
# (idempotent: later calls only re-install when setup.py or requirements.txt change).
PYTHON ?= python3
# Pass VENV_ARGS=--system-site-packages to reuse a Detectron2 you built yourself.
VENV_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rfpn-installed

.PHONY: install demo test benchmark-memory clean-venv

install: $(STAMP)

$(STAMP): setup.py requirements.txt tools/install_detectron2.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	bash tools/install_detectron2.sh $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/run_demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

benchmark-memory: $(STAMP)
	$(BIN)/python tools/benchmark_memory.py

clean-venv:
	rm -rf $(VENV)
