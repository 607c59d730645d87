# The two commands of the README:
#   make test   set up .venv (first time: ~25 min, mostly building mmcv), install the package, run the tests
#   make demo   the same set-up, then train, evaluate and visualise a DCNv2 detector on the embedded data
# Everything lands in .venv; the mmcv wheel is cached per Python + torch in ~/.cache/mmdet_dcnv2.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
PIPC   := $(PIP) install -c constraints.txt
CUDA_HOME ?= /usr/local/cuda
MAX_JOBS  ?= 2
export CUDA_HOME MAX_JOBS
PYTEST_ARGS ?=

SOURCES := setup.py pyproject.toml $(wildcard model-index.yml) $(shell find csrc mmdet_dcnv2 configs tools -type f \( -name '*.py' -o -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.json' -o -name '*.yml' \) 2>/dev/null)

.PHONY: env install test test-fast demo demo-compare clean

env: $(VENV)/.env-done

$(VENV)/.env-done: constraints.txt requirements-dev.txt scripts/build_mmcv_wheel.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIPC) --quiet 'setuptools>=77,<81' wheel ninja packaging
	$(PIPC) torch torchvision
	$(PIPC) "$$(scripts/build_mmcv_wheel.sh $(PY))"
	$(PIPC) -r requirements-dev.txt
	$(PIPC) --no-deps openmim
	touch $@

# A regular (not editable) install: openmim finds a package's configs only under site-packages.
install: $(VENV)/.install-done

$(VENV)/.install-done: $(VENV)/.env-done $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps .
	$(PY) -P -c "import mmdet_dcnv2.ops as ops; print('mmdet_dcnv2 built with', ops.build_info())"
	touch $@

# The pytest script (not `python -m pytest`) keeps the source tree off sys.path: tests import the
# installed package, which has the compiled extension.
test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# -P keeps the repo root off sys.path, so the installed package (with its compiled extension) runs.
DEMO_ARGS ?=
demo: install
	$(PY) -P -m mmdet_dcnv2.tools.demo --work-dir work_dirs/shapes_demo $(DEMO_ARGS)

# The same, plus the regular-ConvNet baseline; prints both APs side by side.
demo-compare: install
	$(PY) -P -m mmdet_dcnv2.tools.demo --work-dir work_dirs/shapes_compare --baseline $(DEMO_ARGS)

clean:
	rm -rf build *.egg-info $(VENV)
