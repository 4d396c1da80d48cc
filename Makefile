# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned first so that no dependency can pull a multi-GB CUDA build of torch on a CPU machine;
# on a GPU machine run e.g. `make TORCH_SPEC="torch==2.13.0" EXTRAS=dev,server,onnx,gpu`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

MODEL ?= preset:tiny-sd
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

# The main job. Until the server lands this is a generation demo on the bundled model.
serve: $(STAMP)
	$(BIN)/lcmserve generate "$(PROMPT)" --model "$(MODEL)" --steps 4 --guidance 8 --seed 0 -n 4 -o $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
