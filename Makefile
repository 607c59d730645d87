# The two commands of the README:
#   make test   set up .venv (first time ~12 min, mostly building mmcv), install the package, run the tests
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

.PHONY: env install lint format test test-fast release-check demo demo-compare ablation pretrain spatial-support clean

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

# Style (seconds): ruff's lint and format check for Python, clang-format for csrc/. `make format` fixes.
CSRC := $(shell find csrc -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) | sort)
lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

format: env
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CSRC)

# The pytest script (not `python -m pytest`) keeps the source tree off sys.path: tests import the
# installed package, which has the compiled extension.
test: lint install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: lint install
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# Before a release (not in CI: ~15 min or more): the README's `make test` in a fresh clone of HEAD in a
# temporary directory, as a newcomer would run it (only committed files). The mmcv wheel cache is shared
# unless MMDET_DCNV2_CACHE points elsewhere (an empty directory makes it a fully cold run).
release-check:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  git clone --quiet . "$$tmp/mmdet_dcnv2" && cd "$$tmp/mmdet_dcnv2" && \
	  echo "release-check: make test in a fresh clone of $$(git rev-parse --short HEAD) at $$tmp" && \
	  start=$$(date +%s) && $(MAKE) --no-print-directory test && \
	  echo "release-check: passed in $$(( $$(date +%s) - start )) s"

# The shapes benchmark (docs/main_job.md). -P keeps the repo root off sys.path, so the installed package
# (with its compiled extension) runs. DEMO_ARGS adds options to each of these (e.g. DEMO_ARGS="--threads 2").
DEMO_ARGS ?=
# make demo: DCNv2 (mdconv c3-c5), seed 0: train, evaluate on test (+ the geometry-off control), draw.
demo: install
	$(PY) -P -m mmdet_dcnv2.tools.demo --work-dir work_dirs/shapes_demo $(DEMO_ARGS)

# make demo-compare: regular ConvNet vs DCNv2, 3 paired seeds, two runs at a time; paired statistics.
COMPARE_DIR := work_dirs/shapes_compare
demo-compare: install
	$(PY) -P -m mmdet_dcnv2.tools.demo --work-dir $(COMPARE_DIR) --models regular dcnv2 --seeds 0 1 2 --jobs 2 $(DEMO_ARGS)

# make ablation: the paper's Table 1 rows at this scale; reuses demo-compare's runs (same work dir), adds
# DCNv1 (dconv + dpool), DCNv2 + mdpool and + R-CNN feature mimicking at the seeds named after ':' (seed 0;
# more: ABLATION_ROWS="dcnv1:0,1,2 ..."; each added run costs ~5 min of a 2-run wave here).
ABLATION_ROWS ?= dcnv1:0 dcnv2_mdpool:0 dcnv2_mdpool_mimic:0
ablation: install
	$(PY) -P -m mmdet_dcnv2.tools.demo --work-dir $(COMPARE_DIR) --models regular dcnv2 $(ABLATION_ROWS) \
	  --seeds 0 1 2 --jobs 2 $(DEMO_ARGS)

# make pretrain: the backbone's classification pretraining (~12 min on 2 cores) into the cache the demo
# reads ($$MMDET_DCNV2_CACHE/pretrained, default ~/.cache/mmdet_dcnv2); the demo runs it itself when the
# file is missing. Nothing is committed: the weights are generated.
PRETRAINED := $(or $(MMDET_DCNV2_CACHE),$(HOME)/.cache/mmdet_dcnv2)/pretrained/shapes_resnet50_w16.pth
pretrain: install
	$(PY) -P -m mmdet_dcnv2.tools.pretrain_backbone --out $(PRETRAINED)

# The spatial-support pictures of docs/spatial_support.md: the same nodes on demo-compare's regular and
# DCNv2 models (seed 0), side by side (python -m mmdet_dcnv2.tools.spatial_support; ~10 s per model).
# Needs `make demo-compare` first (not a make prerequisite: training takes a while); stops with a message
# if its runs are missing. The image and nodes are SS_IMAGE / SS_NODES.
SS_IMAGE  ?= data/shapes/test/000017.png
SS_NODES  ?= conv:94,88 cls:37,23,151,154\#2
SS_DIR    ?= work_dirs/spatial_support
spatial-support: install
	for arm in regular dcnv2; do run=$(COMPARE_DIR)/$$arm/seed0; \
	  test -f $$run/metrics.json || { echo "spatial-support: $$run has no finished run; run 'make demo-compare' first" >&2; exit 1; }; \
	  cfg=$$(ls $$run/faster_rcnn_*.py) && ckpt=$$(ls $$run/iter_*.pth) || exit 1; \
	  $(PY) -P -m mmdet_dcnv2.tools.spatial_support $$cfg $$ckpt $(SS_IMAGE) \
	    --nodes $(SS_NODES) --out-dir $(SS_DIR)/$$arm || exit 1; done
	for f in $(SS_DIR)/regular/*.npz; do name=$$(basename $$f .npz); \
	  $(PY) -P -m mmdet_dcnv2.tools.spatial_support_compare $$f $(SS_DIR)/dcnv2/$$name.npz --dpi 72 --colors 128 \
	    --labels "regular ConvNet" "DCNv2 (mdconv c3-c5)" --out $(SS_DIR)/compare_$$name.png || exit 1; done

clean:
	rm -rf build *.egg-info $(VENV)

# ---- CUDA kernels: sanitizers and the GPU check (docs/cuda.md) ----

# The CPU kernels and the host-run CUDA kernels under AddressSanitizer + UndefinedBehaviorSanitizer
# (float-cast-overflow included), running the op tests (scripts/sanitize.sh; builds into build/sanitize).
sanitize: env
	PYTHON=$(PY) scripts/sanitize.sh

# On a machine with an NVIDIA GPU, torch >= 2.11, nvcc, ninja, pytest and hypothesis (no network, no
# mmcv/mmdet needed, no .venv): build for the visible GPU with all cores, the CUDA op tests,
# compute-sanitizer memcheck, benchmarks; one report in work_dirs/gpu_check/report.txt (<= 8 min).
# Uses the python on PATH (PYTHON=... to choose); without a GPU it stops with a message (exit 2).
gpu-check:
	PYTHON=$(PYTHON) MAX_JOBS=$$(nproc) scripts/gpu_check.sh

.PHONY: sanitize gpu-check
