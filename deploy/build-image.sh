#!/usr/bin/env bash
# Build the repository's Dockerfile without a Docker engine or a registry, then prove that the
# server inside the image answers /generate with an image.
#
#   sudo deploy/build-image.sh            # as root; needs buildah, podman, debootstrap, curl
#
# 1. base image: a Debian bookworm minbase made with debootstrap and `podman import`
#    (bookworm's python3 is 3.11, the ABI of the torch CPU wheel used below)
# 2. `buildah bud --isolation=chroot` of ./Dockerfile with BASE_IMAGE set to that base and torch
#    installed from a local CPU wheel mounted into the RUN steps (no CUDA build is pulled)
# 3. `buildah run` of the image's ENTRYPOINT + CMD (`podman run` fails on these machines: crun
#    may not set RLIMIT_NOFILE), its HEALTHCHECK command, gRPC health, a POST /generate that
#    must return a PNG, then SIGTERM: the server must drain and exit 0.
#
# Settings (environment): HOST_CA_BUNDLE (CA bundle pip trusts in the build; default $PIP_CERT or
# the system's), DEBIAN_MIRROR, BASE_TAG, IMAGE_TAG, TORCH_WHEEL (a torch CPU wheel
# for cp311; by default `pip download torch==$TORCH_VERSION` through pip's own configuration),
# TORCH_VERSION, PYTHON (one with pip; default .venv/bin/python), WORK (scratch folder), PORT
# (loopback port of the test run), KEEP_IMAGE=0 to delete the image afterwards.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_TAG="${BASE_TAG:-localhost/lcmserve-base:bookworm}"
IMAGE_TAG="${IMAGE_TAG:-localhost/lcmserve:cpu}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
WORK="${WORK:-/var/tmp/lcmserve-image}"
PORT="${PORT:-18080}"
HOST_CA_BUNDLE="${HOST_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
PYTHON="${PYTHON:-$( [[ -x "$REPO/.venv/bin/python" ]] && echo "$REPO/.venv/bin/python" || echo python3 )}"
CONTAINER=""
SERVER_PID=""

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { log "FAILED: $*"; exit 1; }

cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then kill "$SERVER_PID" || true; fi
  if [[ -n "$CONTAINER" ]]; then buildah rm "$CONTAINER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

for tool in buildah podman debootstrap curl ss "$PYTHON"; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y buildah podman debootstrap curl)"
done
[[ "$(id -u)" == 0 ]] || die "run as root: debootstrap and buildah's chroot isolation need it"
mkdir -p "$WORK"
START=$(date +%s)

# 1. base image ------------------------------------------------------------------------------
if podman image exists "$BASE_TAG"; then
  log "1. base image $BASE_TAG exists; kept"
else
  log "1. debootstrap bookworm (minbase) from $DEBIAN_MIRROR"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" \
    > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
  rm -rf "$WORK/rootfs"
  log "   imported $BASE_TAG"
fi
podman image ls --format '   {{.Repository}}:{{.Tag}} {{.Size}}' "$BASE_TAG"

# 2. the image -----------------------------------------------------------------------------------
if [[ -z "${TORCH_WHEEL:-}" ]]; then
  mkdir -p "$WORK/wheels"
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    -d "$WORK/wheels" "torch==$TORCH_VERSION" >/dev/null
  WHEELS=("$WORK"/wheels/torch-"$TORCH_VERSION"*.whl)
  TORCH_WHEEL="${WHEELS[0]}"
fi
[[ -f "$TORCH_WHEEL" ]] || die "no torch wheel at $TORCH_WHEEL (set TORCH_WHEEL to a torch CPU wheel for cp311)"
WHEEL_NAME="$(basename "$TORCH_WHEEL")"
[[ "$WHEEL_NAME" == *+cpu* ]] || log "   warning: $WHEEL_NAME is not a +cpu build; the image may carry CUDA libraries"
log "2. buildah bud $IMAGE_TAG (BASE_IMAGE=$BASE_TAG, torch from $WHEEL_NAME)"
BUILD_START=$(date +%s)
# --format docker: the OCI format has no HEALTHCHECK or SHELL. The host's CA bundle goes into
# the RUN steps for pip (PIP_CERT), for networks whose TLS is re-signed by a proxy.
buildah bud --isolation=chroot --layers --format docker \
  --build-arg BASE_IMAGE="$BASE_TAG" \
  --build-arg TORCH_SPEC="/wheels/$WHEEL_NAME" \
  --build-arg PIP_CERT=/run/host-ca/ca-certificates.crt \
  --volume "$(dirname "$TORCH_WHEEL"):/wheels:ro" \
  --volume "$HOST_CA_BUNDLE:/run/host-ca/ca-certificates.crt:ro" \
  -f "$REPO/Dockerfile" -t "$IMAGE_TAG" "$REPO"
log "   built in $(( $(date +%s) - BUILD_START )) s"
podman image ls --format '   {{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE_TAG"
buildah inspect --type image --format \
  '   user={{.OCIv1.Config.User}} entrypoint={{.OCIv1.Config.Entrypoint}} cmd={{.OCIv1.Config.Cmd}} ports={{.OCIv1.Config.ExposedPorts}}' \
  "$IMAGE_TAG"
echo

# 3. the server inside -------------------------------------------------------------------------
log "3. buildah run: the image's entrypoint + cmd on 127.0.0.1:$PORT (host network; loopback for this check)"
CONTAINER="$(buildah from "$IMAGE_TAG")"
# chroot isolation shares the host's network: keep the check on loopback
GRPC_PORT=$((PORT + 1))
buildah config --env LCMSERVE_HOST=127.0.0.1 --env LCMSERVE_PORT="$PORT" --env LCMSERVE_GRPC_PORT="$GRPC_PORT" \
  --env LCMSERVE_DRAIN_GRACE_S=10 "$CONTAINER"
mapfile -t COMMAND < <(buildah inspect --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}{{range .OCIv1.Config.Cmd}}{{println .}}{{end}}' "$CONTAINER" | sed '/^$/d')
log "   command: ${COMMAND[*]}"
buildah run --isolation=chroot "$CONTAINER" -- "${COMMAND[@]}" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; die "the server exited before it was ready"; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/readyz" || { cat "$WORK/server.log"; die "not ready after 300 s"; }
echo
mapfile -t HEALTHCHECK < <(buildah inspect --type image --format '{{range .Docker.Config.Healthcheck.Test}}{{println .}}{{end}}' "$IMAGE_TAG" | sed '/^$/d')
[[ "${HEALTHCHECK[0]:-}" == "CMD" ]] || die "no exec-form HEALTHCHECK in the image: ${HEALTHCHECK[*]:-none}"
buildah run --isolation=chroot "$CONTAINER" -- "${HEALTHCHECK[@]:1}" && log "   HEALTHCHECK command: exit 0"
log "   whoami inside: $(buildah run --isolation=chroot "$CONTAINER" -- id)"
# The caches the runtime user fills (ONNX graphs, TensorRT engines, torch.compile kernels) are writable.
buildah run --isolation=chroot "$CONTAINER" -- python -c "import os, pathlib
for var in ('LCMSERVE_CACHE_DIR', 'TORCHINDUCTOR_CACHE_DIR'):
    probe = pathlib.Path(os.environ[var]) / '.probe'
    probe.write_text('ok'); probe.unlink()" && log "   LCMSERVE_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR: writable" \
  || die "the runtime user cannot write its cache folders"
# What compiles at run time compiles here, as the runtime user: the small-head attention kernel,
# and the compiled backend's torch.compile C++ (inductor, with the backend's settings: C++ wrapper,
# frozen weights) with its group-norm kernel.
buildah run --isolation=chroot "$CONTAINER" -- python -c "import torch
from lcmserve.engine.kernels import attention as k
print(k.build_kernel()); k.load_kernel(); q = torch.randn(1, 2, 5, 4)
torch.testing.assert_close(k.small_head_attention(q, q, q).transpose(1, 2), torch.nn.functional.scaled_dot_product_attention(q, q, q))" \
  && log "   --attention small-head: kernel built and run in the image" || die "the small-head kernel does not build in the image"
buildah run --isolation=chroot "$CONTAINER" -- python -c "import torch
from lcmserve.engine.kernels import group_norm as g
from lcmserve.engine.backends.cuda_graph import inductor_cpu_settings
norm = torch.nn.GroupNorm(8, 32); g.use_group_norm_kernel(norm)
x = torch.randn(2, 32, 32, 32).contiguous(memory_format=torch.channels_last)
f = torch.compile(lambda x: torch.nn.functional.silu(norm(x)))
with torch.inference_mode(), torch._inductor.config.patch(**inductor_cpu_settings()), torch.profiler.profile() as prof: y = f(x)
assert any(e.key == 'lcmserve::group_norm_stats' for e in prof.key_averages())
torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 8)))" \
  && log "   torch.compile (inductor C++, C++ wrapper, frozen) with the group-norm kernel: compiled and run in the image" \
  || die "torch.compile or the group-norm kernel does not work in the image"
curl -sf -X POST "http://127.0.0.1:$PORT/generate" -H 'content-type: application/json' \
  -d '{"prompt": "a red circle at the top left", "steps": 4, "seed": 7}' -o "$WORK/generate.json" \
  || { cat "$WORK/server.log"; die "POST /generate"; }
"$PYTHON" - "$WORK/generate.json" <<'PY'
import base64, json, struct, sys
body = json.load(open(sys.argv[1]))
png = base64.b64decode(body["images"][0]["b64"])
assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
width, height = struct.unpack(">II", png[16:24])
print(f"   POST /generate: model={body['model']} seed={body['images'][0].get('seed')} "
      f"PNG {width}x{height}, {len(png)} bytes")
PY
"$PYTHON" - "$GRPC_PORT" <<'PY'
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
assert status == "SERVING", status
print(f"   gRPC grpc.health.v1 on :{sys.argv[1]}: {status}")
PY
# the stubs compiled at build time are used as they are (the user cannot write /opt/lcmserve)
! grep -q "compiled gRPC stubs" "$WORK/server.log" || die "the server recompiled the gRPC stubs at start-up"
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^lcmserve_(images_generated_total|ready) ' | sed 's/^/   /'

# SIGTERM to the server process itself (buildah run does not forward signals)
PID_INSIDE="$(ss -Hltnp "sport = :$PORT" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)"
[[ -n "$PID_INSIDE" ]] || die "cannot find the server's pid on port $PORT"
log "   SIGTERM to the server (pid $PID_INSIDE)"
kill -TERM "$PID_INSIDE"
set +e
wait "$SERVER_PID"; RC=$?
set -e
SERVER_PID=""
grep -E "draining|drained|stopped" "$WORK/server.log" | sed 's/^/   /'
[[ "$RC" == 0 ]] || die "the server exited with $RC after SIGTERM"
log "   server exited 0 after the drain"
if [[ "${KEEP_IMAGE:-1}" != 1 ]]; then buildah rmi "$IMAGE_TAG" >/dev/null; fi
log "done in $(( $(date +%s) - START )) s: $IMAGE_TAG builds and serves"
