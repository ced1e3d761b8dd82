# `make test` and `make demo` set everything up on a fresh machine (a venv with the CPU build of
# torch 2.13.0 and this project with its extras), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-all lint docs demo bench bench-kernels bench-forms bench-real eval frontier ep-ranks calibrate train clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench,eval,distributed]'
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

# Which expert compute experts="auto" picks, per ISA (docs/benchmarks.md; ~1 min).
bench-kernels: $(STAMP)
	$(PY) bench/bench_expert_kernels.py

# One block per routing form reached last (DeepSeek-V2, PhiMoE, LongCat zero-compute, dense dispatch):
# default Inductor vs lynx none vs lynx, per ISA (docs/benchmarks.md; ~1.5 min).
bench-forms: $(STAMP)
	$(PY) bench/bench_routing_forms.py

# A full-size OLMoE-1B-7B-shaped decode step, random bf16 weights (~15 GB of memory, ~30 min).
bench-real: $(STAMP)
	$(PY) bench/bench_real_model.py

eval: $(STAMP)
	$(VENV)/bin/lynx-compile eval

# Every policy setting side by side on both shipped checkpoints, B = 16/32/64 (docs/policies.md,
# "The default"): bench/results/frontier/frontier_<checkpoint>.{json,md,png}; ~10 min per checkpoint.
FRONTIER_COMMON := none moved_mass moved_mass:max_moved=0.01 moved_mass:max_moved=0.02 moved_mass:max_moved=0.03 \
  moved_mass:max_moved=0.04 moved_mass:max_moved=0.05 moved_mass:max_moved=0.07 moved_mass:max_moved=0.08 \
  moved_mass:max_moved=0.12 affinity_binning protected_mass:keep_mass=0.5 protected_mass:keep_mass=0.6 \
  protected_mass:keep_mass=0.7 protected_mass:keep_mass=0.8 protected_mass:keep_mass=0.9 opportunistic:keep_top=1
frontier: $(STAMP)
	$(PY) bench/policy_frontier.py --checkpoint coarse --settings $(FRONTIER_COMMON) affinity_binning:alpha=1.4 \
	  gate_mass_budget:expert_budget=4 gate_mass_budget:expert_budget=5 gate_mass_budget:expert_budget=6
	$(PY) bench/policy_frontier.py --checkpoint fine --settings $(FRONTIER_COMMON) opportunistic:keep_top=2 \
	  opportunistic:keep_top=3 gate_mass_budget:expert_budget=12 gate_mass_budget:expert_budget=16 \
	  gate_mass_budget:expert_budget=20 gate_mass_budget:expert_budget=24

# The most experts one of 8 expert-parallel ranks reads per decode step, both shipped checkpoints,
# B = 16/32/64 (docs/policies.md, "Expert parallelism"): bench/results/ep_ranks/; ~3 min.
ep-ranks: $(STAMP)
	$(PY) bench/ep_ranks.py

# Per-layer plans for both shipped checkpoints under two budgets (docs/calibration.md).
calibrate: $(STAMP)
	for name in coarse fine; do \
	  $(VENV)/bin/lynx-compile calibrate --checkpoint $$name --budget kl=0.01 \
	    --out bench/results/plans/plan_$${name}_kl0.01.json || exit 1; \
	  $(VENV)/bin/lynx-compile calibrate --checkpoint $$name --budget kl=0.01,top1_agreement=0.95 \
	    --out bench/results/plans/plan_$${name}_kl0.01_top0.95.json || exit 1; \
	done

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
