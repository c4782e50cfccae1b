# promptfleet — the two commands of the Quick start, and their helpers.
#   make start   install (first time) and start promptfleet on a local Ray cluster
#   make test    install what the tests need and run lint, types and the suite (all but the cluster tier)
#   make test-cluster   the multi-node tier: a head and two worker nodes on loopback addresses
#   make docs    serve the manual (docs/, MkDocs) on 127.0.0.1:8002; make docs-check builds it strictly
#   make coverage   the unit tier with line coverage, failing under the floor in pyproject.toml
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# llama.cpp's default build enables every instruction set of the build machine, AMX included, and
# its AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat) on the Sapphire Rapids VMs we run on.
# A portable x86-64 build (AVX2/FMA/F16C: every x86 server CPU since 2015) has no AMX kernels.
# pip caches the wheel it builds: a wheel cached before this setting must be removed to take effect
# (`pip cache remove llama_cpp_python`).
DOCS_PORT ?= 8002
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: start stop status test test-cluster lint unit coverage docs docs-check bench

start: $(VENV)/.installed
	$(BIN)/promptfleet start

stop: $(VENV)/.installed
	$(BIN)/promptfleet stop --ray

status: $(VENV)/.installed
	$(BIN)/promptfleet status

# The unit tier runs once, under coverage (its figure printed, its floor enforced); then the Ray tiers.
test: $(VENV)/.installed-test lint docs-check coverage
	$(BIN)/python -m pytest -m "not cluster" --ignore=tests/unit $(PYTEST_ARGS)

test-cluster: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/cluster -m cluster $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check deployments jobs cluster bench tests
	$(BIN)/mypy

unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# Without PYTEST_ARGS: the floor is for the whole unit tier (a -k would measure less of it).
coverage: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/unit --cov --cov-report=term

docs: $(VENV)/.installed-test
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

# --strict: a broken link or anchor, or a page left out of the nav, fails the build (mkdocs.yml).
docs-check: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: $(VENV)/.installed-test
	$(BIN)/python -m bench.gateway $(BENCH_ARGS)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# llama-cpp-python compiles from source the first time (~5 min on 2 cores); pip caches the wheel.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test,docs]'
	touch $@
