#!/usr/bin/env bash
# Wheels for a CUDA machine that has torch, transformers and the rest but not diffusers:
# the pure-Python packages lcmserve needs there, at the versions this checkout's venv runs,
# into .whl/ (scripts/gpu-pass.sh installs them into /tmp/site first).
# Usage: scripts/gpu-wheels.sh [PACKAGE ...]   (default: diffusers importlib_metadata)
set -eu
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(diffusers importlib_metadata)
for pkg in "${pkgs[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$pkg==$version"
done
ls -l .whl
