# Two entry points for a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint bench grpc-stubs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/ntm-serve --host $(HOST) --port $(PORT)

# tests/browser drive Debian's Chromium and tests/deploy render docker/k8s with kubectl: scripts/install-chromium
# and scripts/install-kubectl install them once, and do nothing when they are there. The tests run on one torch
# thread each (tests/conftest.py), so two pytest-xdist workers keep both cores busy; the tests marked `inductor`
# (compiling on both cores) form one group, run one after another on one worker (tests/conftest.py).
test: $(VENV)/.installed
	bash scripts/install-chromium
	VENV=$(VENV) bash scripts/install-kubectl
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n 2 --dist loadgroup

bench: $(VENV)/.installed
	$(PY) -m bench.model
	$(PY) -m bench.training
	$(PY) -m bench.http
	$(PY) -m bench.soak

# The gRPC stubs from service/api/grpc/grpc_predict_v2.proto (committed; tests/unit/test_grpc_stubs.py checks them).
grpc-stubs: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. service/api/grpc/grpc_predict_v2.proto
