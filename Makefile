# Set-up and entry points. `make demo` and `make test` create .venv on first use
# (idempotent: later calls only re-install when setup.py or requirements.txt change).
PYTHON ?= python3
# Pass VENV_ARGS=--system-site-packages to reuse a Detectron2 you built yourself.
VENV_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rfpn-installed

.PHONY: install demo test benchmark-memory benchmark-pathfinder benchmark-rfpn long-contours clean-venv

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
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 tests

benchmark-memory: $(STAMP)
	$(BIN)/python tools/benchmark_memory.py

# About 2.5 hours on 2 cores: five methods x 3,000 iterations, two at a time (README, "Pathfinder").
benchmark-pathfinder: $(STAMP)
	$(BIN)/python tools/benchmark_pathfinder.py --iters 3000 --prepare --jobs 2 --copy-to-docs

RFPN_RESULTS := benchmarks/results/benchmark_rfpn_300_stuff105.json benchmarks/results/benchmark_rfpn_300_revnet.json
# About 1.5 hours on 2 cores when nothing is reused: Panoptic FPN (ResNet-18, RevNet-18) vs R-FPN C-RBP-20,
# 8 seeds x 300 iterations, two runs at a time (README, "R-FPN"). Reuses finished runs
# (<output-dir>/<model>_seed<seed>/row.json) and those of the committed results, so on a fresh clone it
# only rebuilds the summary and figure; to retrain, run the command without --previous.
benchmark-rfpn: $(STAMP)
	$(BIN)/python tools/benchmark_rfpn.py --models fpn crbp20 revnet18 --seeds 0 1 2 3 4 5 6 7 --iters 300 --jobs 2 \
		--output-dir output/benchmark_rfpn_300 $(foreach f,$(wildcard $(RFPN_RESULTS)),--previous $(f))

# The committed 14-paddle summaries, reused (the 9-paddle one trained on another set and is not).
LONG_CONTOURS_RESULTS := benchmarks/results/benchmark_long_contours.json
# Several hours on 2 cores (resumable: finished runs are kept, and those of the committed results): long contours with 3x3 kernels,
# C-RBP vs RBP vs BPTT within C-RBP's memory, 3 seeds, and the controls (docs/long_contours.md); then the
# wider-kernel settings over three seeds, one summary and folder per kernel size.
define long_contours_kernel
	$(BIN)/python tools/benchmark_long_contours.py --jobs 2 --control-seeds 0 1 2 --kernel-size $(1) \
		--output-dir output/benchmark_long_contours_$(1)x$(1) \
		$(foreach f,$(wildcard benchmarks/results/benchmark_long_contours_$(1)x$(1).json),--previous $(f))

endef
long-contours: $(STAMP)
	$(BIN)/python tools/benchmark_long_contours.py --prepare --jobs 2 --copy-to-docs \
		$(foreach f,$(wildcard $(LONG_CONTOURS_RESULTS)),--previous $(f))
	$(foreach k,5 7,$(call long_contours_kernel,$(k)))

clean-venv:
	rm -rf $(VENV)
