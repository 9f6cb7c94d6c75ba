# `make demo` and `make test` each set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# CPU-only machines get a pinned CPU build of torch; GPU machines (nvidia-smi present) get
# torch from pyproject's range. Elsewhere than our build machines, point TORCH_INDEX at
# https://download.pytorch.org/whl/cpu to avoid PyPI's multi-GB CUDA wheel.
TORCH_CPU   ?= torch==2.13.0
TORCH_INDEX ?=

# The UI test drives Debian's chromium with Playwright (Playwright's own browser download
# needs the internet); without root or apt it is skipped with a reason.
CHROMIUM    ?= /usr/bin/chromium

.PHONY: setup browser demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install -q -e '.[dev,cluster]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

browser:
	@test -x $(CHROMIUM) || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null \
				|| echo "make: could not install chromium; the UI test will be skipped"; \
		else echo "make: no $(CHROMIUM) and no root apt-get; the UI test will be skipped"; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The edit loop: everything but the tests marked slow (servers, clusters, runs over ~2 s).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/predict.py

clean:
	rm -rf $(VENV) demo-data bench/out test-output .pytest_cache
