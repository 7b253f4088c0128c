# tierkit: `make run` probes this machine and says which milestones fit it, at what size;
# `make test` sets up everything the test suite needs and runs it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# What the tests need from Debian: the Cortex-M toolchain and emulator, espeak-ng
# and sox for synthetic keywords, iproute2 for network namespaces, inxi for the
# probe-speed benchmark.
DEB_PKGS := gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm espeak-ng sox iproute2 inxi dataset-fashion-mnist
# llama-cpp-python is a source build (~13 min on 2 cores); with RPC on for tier 3.
# pip's wheel cache serves every later install. On a CPU with AMX, -march=native
# builds ggml's AMX matmul, which crashes decoding Q8_0 models (seen with 0.3.36
# on Sapphire Rapids): such a build leaves it out, and `llama-check` replaces a
# cached wheel that has it.
NO_AMX := $(shell grep -qs amx_int8 /proc/cpuinfo && echo -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8)
export CMAKE_ARGS ?= -DGGML_RPC=on $(NO_AMX)

.PHONY: run test setup setup-dev deb llama-check bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Base install: probe and fit only (light packages, no frameworks).
$(VENV)/.stamp-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e . --config-settings editable_mode=compat
	touch $@

# Everything: CPU torch pinned first (an unpinned torch pulls GB of CUDA wheels),
# then every tier's extras and the dev tools.
$(VENV)/.stamp-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]' --config-settings editable_mode=compat
	$(MAKE) --no-print-directory llama-check
	touch $@ $(VENV)/.stamp-base

# A llama.cpp built with AMX on this CPU (an old cached wheel): drop it from pip's
# cache and build again without it.
llama-check:
	@if [ -n "$(NO_AMX)" ] && $(BIN)/python -c "import llama_cpp, sys; sys.exit('AMX_INT8 = 1' not in llama_cpp.llama_print_system_info().decode())"; then \
		echo "llama-cpp-python was built with AMX, which crashes here: building it again without (~13 min)"; \
		$(BIN)/pip cache remove 'llama_cpp_python*' >/dev/null; \
		$(BIN)/pip install -q --force-reinstall --no-deps "llama-cpp-python==$$($(BIN)/python -c 'import llama_cpp; print(llama_cpp.__version__)')"; \
	fi

setup: $(VENV)/.stamp-base
setup-dev: deb $(VENV)/.stamp-dev

deb:
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "not root: some tests will skip until you run: sudo apt-get install $$missing"; \
	fi

run: setup
	$(BIN)/tierkit probe
	$(BIN)/tierkit fit
	@echo
	@echo "Next:"
	@echo "  $(BIN)/tierkit fit --milestone B5 --explain   # the arithmetic behind one plan"
	@echo "  make setup-dev                                  # install what the milestones marked 'install first' need"
	@echo "  $(BIN)/tierkit run B5                          # run one, predicted vs actual in builds/B05-roofline/"

test: setup-dev
	$(BIN)/python -m pytest -q

bench: setup-dev
	$(BIN)/python bench/probe_speed.py

clean:
	rm -rf $(VENV) builds .pytest_cache
