# syntax=docker/dockerfile:1
# lcmserve: `lcmserve serve` listening on 0.0.0.0, REST + /metrics on 8000 and gRPC on 50051.
#
# GPU (default base: CUDA runtime):
#   docker build -t lcmserve .
#   docker run --gpus all -p 8000:8000 -p 50051:50051 lcmserve
# CPU (no CUDA in the base, torch's CPU wheel):
#   docker build -t lcmserve:cpu --build-arg BASE_IMAGE=debian:bookworm-slim \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Another model, mounted:
#   docker run --gpus all -p 8000:8000 -v /models:/models:ro -e LCMSERVE_MODEL=/models/x lcmserve
#
# BASE_IMAGE must be Debian or Ubuntu based: python3 and python3-venv come from its apt. Both
# stages use the same base so that the virtual environment's interpreter path is the same.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# 1. build: torch and lcmserve[server] in a virtual environment at /opt/venv -------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG EXTRAS=server
# The CA bundle pip trusts: the system's store, as with Debian's own pip. A build behind a
# TLS-inspecting proxy mounts its bundle into the RUN steps and points this at it.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    LCMSERVE_CACHE_DIR=/opt/lcmserve/cache
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions follow the base image's release; pinning them here would tie the file to one base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# torch first and from its own index (CUDA build on PyPI, CPU build on PyTorch's cpu index);
# the package's own `torch>=2.4` is then already met and nothing swaps the build. TORCH_SPEC
# is a pinned requirement (hadolint cannot see through the build argument).
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lcmserve ./lcmserve
# A regular (not editable) install: the bundled default model is package data and lands in the venv.
# The gRPC stubs ship in the package (generated from proto/ and checked by a test), so nothing
# is compiled at start-up. The dependencies' ranges are the project's own (pyproject.toml), not pins.
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]" \
    && python -c "import lcmserve.server.grpc" \
    && mkdir -p /opt/lcmserve \
    && chmod -R a+rX /opt/lcmserve

# 2. runtime: the base, python3, the venv, a non-root user ---------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# g++ and python3-dev: what compiles at run time needs them (torch.compile's C++ and Triton
# kernels for --backend compiled and cuda-graph --compile, the --attention small-head kernel).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 g++ python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/lcmserve lcmserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/lcmserve /opt/lcmserve
# The runtime user writes exported ONNX graphs, TensorRT engines, built kernels and torch.compile's
# code (TORCHINDUCTOR_CACHE_DIR, the compiled backend) here; mount a volume on it to keep them.
RUN mkdir -p /opt/lcmserve/cache/inductor && chown -R 10001:10001 /opt/lcmserve/cache
# LCMSERVE_HOST: inside a container the server must listen on every interface to be reachable
# through the published ports; the code's own default stays loopback.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/lcmserve/.cache/huggingface \
    LCMSERVE_CACHE_DIR=/opt/lcmserve/cache \
    TORCHINDUCTOR_CACHE_DIR=/opt/lcmserve/cache/inductor \
    LCMSERVE_HOST=0.0.0.0 \
    LCMSERVE_PORT=8000 \
    LCMSERVE_GRPC_PORT=50051 \
    LCMSERVE_DRAIN_GRACE_S=30
USER 10001:10001
WORKDIR /home/lcmserve
EXPOSE 8000 50051
# Liveness of the HTTP server; the port follows LCMSERVE_PORT. No curl in the image: Python asks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LCMSERVE_PORT', '8000'), timeout=4)"]
# SIGTERM drains: queued and running work finishes within LCMSERVE_DRAIN_GRACE_S, then exit 0.
# Give the container that long to stop: `docker stop -t 45`, compose stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lcmserve"]
CMD ["serve"]
