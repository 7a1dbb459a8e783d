# Diffusion from Scratch: every target sets up what it needs.
#   make setup          create .venv with the library and its dev tools (once; again when pyproject changes)
#   make data           find or download Fashion-MNIST and verify it
#   make lab            open JupyterLab at the repository root with the first lesson
#   make course         run every lesson headless (papermill) into build/full; SMOKE=1 for build/smoke
#   make notebooks      re-run every lesson in place (full mode) to refresh the committed outputs
#   make test           unit tests + every notebook through nbval (smoke mode); what CI runs
#   make doctor / lint / bench

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SMOKE  ?= 0
# Idle OpenMP threads sleep instead of spinning (torch on a busy 2-core machine is 5-30x slower otherwise).
export OMP_WAIT_POLICY ?= PASSIVE
NBVAL  := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: setup data lab course notebooks test doctor lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

data: $(STAMP)
	$(PY) -m lessons_lib data

doctor: $(STAMP)
	$(PY) -m lessons_lib doctor

lab: $(STAMP) data
	$(PY) -m lessons_lib lab

course: $(STAMP) data
	$(PY) -m lessons_lib course $(if $(filter 1,$(SMOKE)),--smoke,)

notebooks: $(STAMP) data
	$(PY) -m lessons_lib course --inplace

test: $(STAMP) data
	LESSONS_SMOKE=1 LESSONS_HEADLESS=1 $(PY) -m pytest tests notebooks $(NBVAL) -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check lessons_lib tests benchmarks

bench: $(STAMP)
	@for b in metric_calibration train_throughput sampling_overhead; do $(PY) benchmarks/$$b.py || exit 1; done
	$(PY) -m lessons_lib bench  # the long ones (time_to_quality, quality_per_nfe) are run by hand: see README

clean:
	rm -rf build .pytest_cache
