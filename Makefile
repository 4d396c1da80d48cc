# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned first so that no dependency can pull a multi-GB CUDA build of torch on a CPU machine;
# on a GPU machine run e.g. `make TORCH_SPEC="torch==2.13.0" EXTRAS=dev,server,onnx,gpu`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,server,onnx
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

# `make serve` settings, e.g. `make serve PORT=8123 GRPC_PORT=0` or
# `make serve MODEL=shapes-teacher LORA=shapes-lcm-lora` (the teacher with its shipped LCM-LoRA).
# One left unset passes no flag, so its LCMSERVE_* environment variable or the server's default holds.
MODEL ?=
LORA ?=
HOST ?=
PORT ?=
GRPC_PORT ?=
# BACKEND: the server's default is auto (compiled bfloat16 on a CPU with bfloat16 instructions: the first start
# builds for minutes, later ones load from ~/.cache/lcmserve); BACKEND=torch starts at once on the eager path.
BACKEND ?=
SERVE_FLAGS = $(if $(MODEL),--model "$(MODEL)") $(if $(LORA),--lora "$(LORA)") $(if $(HOST),--host "$(HOST)") \
	$(if $(PORT),--port "$(PORT)") $(if $(GRPC_PORT),--grpc-port "$(GRPC_PORT)") $(if $(BACKEND),--backend "$(BACKEND)")

.PHONY: venv serve test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

# The main job: REST on http://127.0.0.1:8000 by default (playground at /, docs at /docs), gRPC on :50051.
serve: $(STAMP)
	$(BIN)/lcmserve serve $(SERVE_FLAGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
