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

MODEL ?= shapes-lcm
# e.g. `make serve MODEL=shapes-teacher LORA=shapes-lcm-lora`: the teacher with its shipped LCM-LoRA
LORA ?=
PROMPT ?= a red circle at the top left
OUT ?= out

.PHONY: venv serve test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

# The main job: REST on http://127.0.0.1:8000 (playground at /, docs at /docs), gRPC on :50051.
serve: $(STAMP)
	$(BIN)/lcmserve serve --model "$(MODEL)" $(if $(LORA),--lora "$(LORA)") --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
