# The two everyday commands. Each creates .venv on first use and installs the project into it; the stamp file
# makes later runs skip the install until pyproject.toml changes.
#   make test    all tests (slow ones included)
#   make audit   the default audit of the bundled model
#   make bench   the ground-truth benchmarks and costs -> bench/results/*.json, docs/benchmarks.md, docs/figures/

PYTHON ?= python3
VENV := .venv
# Pinned because an unpinned torch pulls the multi-GB CUDA build; this pin resolves to a CPU wheel here.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test audit install bench

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q

# The default audit: shapes-default on the bundled shapes-v1, HTML and PDF, into reports/<run-id>/.
audit: $(STAMP)
	$(VENV)/bin/auditor audit prompt_suites/shapes-default.yaml

# Selective vs DAAM mIoU, label-free head rankings, misinterpretation, maps of given images, calibration budget, capture overhead and audit wall time on the
# bundled shapes-v1 (fixed seeds; about 30 minutes on the project's idle 2-core CPU), then bench/report.py rewrites
# its sections of docs/benchmarks.md and the figures in docs/figures/.
# BENCH_THREADS=1 when something else uses the other core (two torch threads on a busy core spin-wait).
BENCH_THREADS ?= 2
bench: $(STAMP)
	@mkdir -p work_bench && date +%s > work_bench/bench_started
	$(VENV)/bin/python bench/miou.py --fresh --threads $(BENCH_THREADS)
	$(VENV)/bin/python bench/head_ranking.py --threads $(BENCH_THREADS)
	$(VENV)/bin/python bench/misinterpretation.py --threads $(BENCH_THREADS)
	$(VENV)/bin/python bench/image_maps.py --threads $(BENCH_THREADS)
	$(VENV)/bin/python bench/calibration.py --threads $(BENCH_THREADS)
	$(VENV)/bin/python bench/capture_overhead.py
	$(VENV)/bin/python bench/audit_cost.py --threads $(BENCH_THREADS)
	$(VENV)/bin/python bench/throughput.py
	$(VENV)/bin/python bench/cost_model.py
	$(VENV)/bin/python bench/report.py --started-at $$(cat work_bench/bench_started)
