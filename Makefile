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

# Debian packages some tests need, installed where root and apt are (one apt-get update):
# chromium for the UI test (Playwright drives it; its own browser download needs the
# internet), and munge, slurmctld, slurmd and slurm-client for the tests on a real one-node
# SLURM. Without them those tests are skipped with a reason.
CHROMIUM    ?= /usr/bin/chromium
SYSTEM_PACKAGES := $(if $(wildcard $(CHROMIUM)),,chromium) $(if $(wildcard /usr/sbin/slurmctld),,slurmctld) \
	$(if $(wildcard /usr/sbin/slurmd),,slurmd) $(if $(wildcard /usr/sbin/munged),,munge) \
	$(if $(wildcard /usr/bin/sbatch),,slurm-client)

# bioimageio.core, the model zoo's own runner, checks that overtile's bioimage.io exports run
# there (tests/test_models.py). It pins a bioimageio.spec whose serialisers need an older
# pydantic than overtile's, so it gets an environment of its own inside the venv, which
# finds torch and onnxruntime in overtile's (a .pth file). Without it that test is skipped.
CORE_ENV   := $(VENV)/bioimageio-core
CORE_STAMP := $(CORE_ENV)/.installed-0.11.0

.PHONY: setup system demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install -q -e '.[dev,cluster]'
	rm -f $(VENV)/.installed-*
	touch $@

$(CORE_STAMP): $(STAMP)
	@test -x $(CORE_ENV)/bin/python || $(PYTHON) -m venv $(CORE_ENV)
	@if $(CORE_ENV)/bin/python -m pip install -q "bioimageio.core==0.11.0" "pydantic<2.12"; then \
		$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
			> "$$($(CORE_ENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/overtile-env.pth" \
		&& touch $@; \
	else rm -rf $(CORE_ENV); echo "make: could not install bioimageio.core; its test will be skipped"; fi

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

system:
	@test -z "$(strip $(SYSTEM_PACKAGES))" || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES)) >/dev/null \
				|| echo "make: could not install $(strip $(SYSTEM_PACKAGES)); the tests that need them will be skipped"; \
		else echo "make: no root apt-get for $(strip $(SYSTEM_PACKAGES)); the tests that need them will be skipped"; fi; }

test: $(STAMP) $(CORE_STAMP) system
	$(BIN)/python -m pytest -q

# The edit loop: everything but the tests marked slow (servers, clusters, runs over ~2 s).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/predict.py

clean:
	rm -rf $(VENV) demo-data bench/out test-output .pytest_cache
