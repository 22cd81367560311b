# lora-course: two commands for learners (README): `make lab` and `make test`.
# Everything else here is for maintainers.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lora-course-installed
KERNEL := lora-course
LAB_ARGS ?=
# Jupyter refuses to start as root (containers, CI) unless told to.
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
PYTEST_ARGS ?=
NBVAL_ARGS := --nbval --nbval-kernel-name $(KERNEL) --nbval-cell-timeout 600 --nbval-sanitize-with tests/nbval_sanitize.cfg
export LORA_COURSE_PROFILE ?= offline
export PYTHONHASHSEED := 0

.PHONY: lab test test-browser test-gpu setup notebooks exercises check-env lock readme-table clean-venv

## Set-up: idempotent; re-runs only when the pins or the package metadata change.
setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing torch first (CPU build where one is on disk), then the pinned set"
	$(PY) -m pip install -q --disable-pip-version-check "$$(grep '^torch==' requirements.lock)"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (lora-course)" >/dev/null
	@touch $(STAMP)
	@echo "[setup] done: $(VENV) with kernel '$(KERNEL)'"

## make lab: set up, then JupyterLab on notebooks/ (e.g. make lab LAB_ARGS=--no-browser)
lab: setup
	cd notebooks && ../$(VENV)/bin/jupyter lab $(ROOT_FLAG) $(LAB_ARGS)

## make test: set up, then every check: unit tests, notebooks under nbval (strict), exercise sync.
test: setup
	LORA_COURSE_DEVICE=$${LORA_COURSE_DEVICE:-cpu} $(PY) -m pytest tests notebooks --ignore=notebooks/exercises --ignore=tests/browser $(NBVAL_ARGS) $(PYTEST_ARGS)

## make test-gpu: the reference checks on CUDA (tests marked gpu), records written to data/measurements/,
## then the VRAM sweep (data/measurements/vram/). Without CUDA every case skips with one line and
## nothing is written. The sweep runs even when a check fails (a failing check is a finding).
test-gpu: setup
	@$(PY) -c "import torch; print('[test-gpu] CUDA:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none: every gpu case will be skipped (needs CUDA)')"
	LORA_COURSE_DEVICE=cuda $(PY) -m pytest tests/test_reference_checks.py -m gpu -rs --record-measurements data/measurements $(PYTEST_ARGS); \
	status=$$?; \
	if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  $(PY) -m lora_course.experiments.memory_measured --device cuda || status=1; \
	else echo "[test-gpu] VRAM sweep skipped: needs CUDA"; fi; \
	exit $$status

## make test-browser: JupyterLab opened in headless Chromium runs notebook 00 through the UI
## (screenshot in test-output/browser/). Installs Debian's chromium + chromedriver when root.
test-browser: setup
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "[test-browser] root step: apt-get install chromium chromium-driver (Debian's browser, used headless)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "[test-browser] chromium/chromedriver missing and not root: run 'sudo apt-get install chromium chromium-driver'; the test will be skipped"; \
	  fi; \
	fi
	LORA_COURSE_DEVICE=$${LORA_COURSE_DEVICE:-cpu} $(PY) -m pytest tests/browser -rs -s $(PYTEST_ARGS)

## Re-execute every notebook in place (outputs committed), regenerate notebook 12's Interview Q&A
## from the chapters' (re-executing 12 if it changed), then regenerate the learner copies.
## The bank (notebook 12's Q&A, generated from the chapters' Markdown) is written first, so that
## notebook 12 executes on the current chapters.
notebooks: setup
	LORA_COURSE_DEVICE=$${LORA_COURSE_DEVICE:-cpu} $(PY) -m lora_course.notebook_tools bank --no-execute
	LORA_COURSE_DEVICE=$${LORA_COURSE_DEVICE:-cpu} $(PY) -m lora_course.notebook_tools execute notebooks/[0-9]*.ipynb
	$(MAKE) exercises
	$(MAKE) readme-table

## Regenerate notebooks/exercises/ (solutions stripped) from notebooks/.
exercises: setup
	$(PY) -m lora_course.notebook_tools strip notebooks/[0-9]*.ipynb --out notebooks/exercises

## Print the environment check (paste its output when you report a problem).
check-env: setup
	$(PY) -m lora_course.check_env

## Measure each notebook's run time and rewrite the README's notebook table.
readme-table: setup
	$(PY) -m lora_course.notebook_tools readme-table notebooks/[0-9]*.ipynb --readme README.md

## Re-resolve requirements.lock from requirements.in (needs the package index).
lock:
	rm -rf /tmp/lora-course-lock && $(PYTHON) -m venv /tmp/lora-course-lock
	/tmp/lora-course-lock/bin/pip install -q "$$(grep '^torch==' requirements.in)"
	/tmp/lora-course-lock/bin/pip install -q -r requirements.in
	( echo "# Exact versions of every package the course installs (generated by 'make lock' from requirements.in)."; \
	  /tmp/lora-course-lock/bin/pip freeze | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/' ) > requirements.lock

clean-venv:
	rm -rf $(VENV)
