# The two everyday commands. Each creates .venv on first use and installs the project into it; the stamp file
# makes later runs skip the install until pyproject.toml changes.
#   make test    all tests (slow ones included)
#   make audit   the default audit of the bundled model

PYTHON ?= python3
VENV := .venv
# Pinned because an unpinned torch pulls the multi-GB CUDA build; this pin resolves to a CPU wheel here.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test audit install

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q

# Until `auditor audit` exists, check the suites and show the concepts the audit will score.
audit: $(STAMP)
	@if $(VENV)/bin/auditor audit --help >/dev/null 2>&1; then \
		$(VENV)/bin/auditor audit prompt_suites/shapes-default.yaml; \
	else \
		$(VENV)/bin/auditor suite check prompt_suites/fidelity-core.yaml && \
		$(VENV)/bin/auditor suite check prompt_suites/shapes-default.yaml && \
		$(VENV)/bin/auditor concepts "a red car next to a blue bicycle"; \
	fi
