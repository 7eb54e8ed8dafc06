# meta169 — see README.md. Targets work on a fresh Debian machine; as root they
# install the system packages they need with apt (non-interactive).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8775
RUN_DIR := .run
DEMO_DB := $(CURDIR)/$(RUN_DIR)/demo.db
CACHE ?= $(CURDIR)/.cache
DEB_OUT ?= $(CURDIR)/dist

.PHONY: run test lint typecheck unit integration e2e bench venv devenv system-deps cloud-init clean deb

# venv: the program alone (what `make run` needs, on any machine); devenv: plus what
# the tests, linters and benchmarks need (the libvirt binding among them builds
# against libvirt-dev, which scripts/install-system-deps installs as root).
venv: $(BIN)/.installed
devenv: $(BIN)/.installed-test

$(BIN)/.installed: pyproject.toml setup.py src/meta169/http/_wire.c
	@scripts/install-system-deps python
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "meta169 needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	@touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

run: venv
	@mkdir -p $(RUN_DIR)
	@$(BIN)/meta169 --registry sqlite:///$(DEMO_DB) import examples/demo.yaml
	@echo
	@echo "meta169 demo on 127.0.0.1:$(PORT) (Ctrl-C stops it). Try:"
	@echo "  curl http://127.0.0.1:$(PORT)/openstack/latest/meta_data.json"
	@echo "  curl http://127.0.0.1:$(PORT)/latest/meta-data/"
	@echo "  curl http://127.0.0.1:$(PORT)/latest/meta-data/instance-id"
	@echo "  curl --interface 127.0.0.2 http://127.0.0.1:$(PORT)/openstack/latest/meta_data.json   # the second instance"
	@echo
	exec $(BIN)/meta169 -v --registry sqlite:///$(DEMO_DB) serve --listen 127.0.0.1:$(PORT) --network demo-net

system-deps:
	@scripts/install-system-deps test

cloud-init: devenv
	@scripts/fetch-cloud-init $(CACHE)/cloud-init >/dev/null

lint: devenv
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)

typecheck: devenv
	$(BIN)/mypy --strict src

test: devenv system-deps cloud-init
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)
	$(BIN)/mypy --strict src
	META169_CACHE=$(CACHE) $(BIN)/pytest -q $(PYTEST_ARGS)

unit: devenv
	$(BIN)/pytest -q tests/unit

integration: devenv cloud-init
	META169_CACHE=$(CACHE) $(BIN)/pytest -q tests/integration

e2e: devenv system-deps cloud-init
	META169_CACHE=$(CACHE) $(BIN)/pytest -q tests/e2e

# dist/meta169_VERSION_ARCH.deb (see packaging/build-deb and docs/deployment.md).
deb:
	@scripts/install-system-deps deb
	packaging/build-deb --out $(DEB_OUT)

bench: devenv
	@scripts/install-system-deps bench
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(RUN_DIR) .mypy_cache .ruff_cache .pytest_cache
