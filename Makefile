# `make test` and `make demo` set everything up on a fresh machine (a venv with the CPU build of
# torch 2.13.0 and this project with its extras), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-all lint docs demo bench eval calibrate train clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench,eval]'
	touch $(STAMP)

# Two workers (pytest-xdist), one test file each at a time so module fixtures compile once:
# most of the suite is cold torch.compile, and one process leaves the second core idle.
# `test` skips the tests marked slow (longer variants of checks it already makes); `test-all`
# runs them too, with the property tests at 10,000 generated batches.
test: lint docs
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-all: lint docs
	LYNX_THOROUGH=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

# The import layers (pyproject: [tool.importlinter]; docs/architecture.md): no cycle, nothing upward.
lint: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

# The documentation site (mkdocs.yml), strict: a broken link or anchor fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) bench/bench_moe.py

eval: $(STAMP)
	$(VENV)/bin/lynx-compile eval

# Per-layer plans for both shipped checkpoints under a KL budget (docs/calibration.md).
calibrate: $(STAMP)
	$(VENV)/bin/lynx-compile calibrate --checkpoint coarse --budget kl=0.01 --out bench/results/plans/plan_coarse_kl0.01.json
	$(VENV)/bin/lynx-compile calibrate --checkpoint fine --budget kl=0.01 --out bench/results/plans/plan_fine_kl0.01.json

# One more training leg for both checkpoints at once, one thread each (docs/checkpoints.md):
# continues the saved run in build/training/NAME, or starts one from the shipped weights. Exports to
# build/training/NAME-export; logs in build/training/NAME.log. `make train TRAIN_MINUTES=90`.
TRAIN_MINUTES ?= 60
train: $(STAMP)
	mkdir -p build/training
	pids=; for name in coarse fine; do \
	  if [ -e build/training/$$name/latest ] || [ -e build/training/$$name/latest.old ]; then start=--resume; \
	  else start="--init-from lynx_compile/checkpoints/$$name"; fi; \
	  $(PY) -m lynx_compile.training.train_checkpoint --preset $$name --out build/training/$$name-export $$start \
	    --minutes $(TRAIN_MINUTES) --peak-lr 5e-4 --code-seqs 10 --arith-seqs 10 --threads 1 \
	    >> build/training/$$name.log 2>&1 & pids="$$pids $$!"; \
	done; rc=0; for pid in $$pids; do wait $$pid || rc=1; done; \
	tail -n 3 build/training/coarse.log build/training/fine.log; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
