#!/usr/bin/env bash
# `make image-test`: the image, exercised. Builds it, starts it with a bearer token and TLS, checks
# health, one inference and one refused management call (with the SDK, from outside the image),
# then stops it with SIGTERM and expects a clean exit. Takes minutes and gigabytes; not part of
# `make test`.
#
# Where a container cannot be started (no engine, or a sandbox without cgroups or user
# namespaces), the built image's filesystem is mounted (`podman image mount`) and its entrypoint
# run directly with chroot, as the image's user and with the image's environment: the same files,
# the same interpreter, the same user; only the kernel's isolation is missing.
#
# Settings (environment or make variables):
#   ENGINE        podman or docker (default: whichever is installed, podman first)
#   IMAGE         tag to build (default localhost/vision-serving:image-test)
#   PYTHON_IMAGE  the Dockerfile's base image; a localhost/... name that does not exist yet is
#                 made with debootstrap (Debian bookworm, python3), for hosts without a registry
#   TORCH_INDEX   where torch comes from (the Dockerfile's default: the CPU wheels' index)
#   BUILD_ARGS    extra arguments for the build (e.g. "--isolation chroot --network host")
#   SKIP_BUILD=1  test an image built before
#   PY            the Python that runs the checks (default .venv/bin/python; needs vision_client)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
IMAGE="${IMAGE:-localhost/vision-serving:image-test}"
ENGINE="${ENGINE:-$(command -v podman || command -v docker || true)}"
WORK="$(mktemp -d /tmp/vision-image-test.XXXXXX)"
SERVER_PID="" CONTAINER="" MNT="" MOUNTS=()

log() { printf '\n== %s: %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { printf '\nimage-test: FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
  set +e
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID"; fi
  if [ -n "$CONTAINER" ]; then "$ENGINE" rm -f "$CONTAINER" >/dev/null 2>&1; fi
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null; done
  if [ -n "$MNT" ]; then "$ENGINE" image unmount "$IMAGE" >/dev/null 2>&1; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -n "$ENGINE" ] || fail "needs podman or docker to build the image (apt-get install podman)"
[ -x "$PY" ] || fail "needs $PY with vision_client installed (make install), or set PY="

# -- the base image, where no registry is reachable -------------------------------------------
if [ -n "${PYTHON_IMAGE:-}" ] && [[ "$PYTHON_IMAGE" == localhost/* ]] && ! "$ENGINE" image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || fail "PYTHON_IMAGE=$PYTHON_IMAGE does not exist and debootstrap is missing"
  log "making $PYTHON_IMAGE with debootstrap (Debian bookworm + python3)"
  ROOTFS="$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$ROOTFS" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
  tar -C "$ROOTFS" -c . | "$ENGINE" import - "$PYTHON_IMAGE" >/dev/null
  rm -rf "$ROOTFS"
fi

# -- build --------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  args=(--build-arg FETCH_WEIGHTS=0 --build-arg MODELS=alexnet)  # nothing to download: random weights
  [ -n "${PYTHON_IMAGE:-}" ] && args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
  [ -n "${TORCH_INDEX:-}" ] && args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
  # shellcheck disable=SC2206
  extra=(${BUILD_ARGS:-})
  log "building $IMAGE with $ENGINE ${args[*]} ${extra[*]}"
  start=$(date +%s)
  "$ENGINE" build "${extra[@]}" "${args[@]}" -t "$IMAGE" . || fail "the image does not build"
  log "built in $(($(date +%s) - start)) s"
fi

# -- a token and TLS material ------------------------------------------------------------------
SECRETS="$WORK/secrets"
mkdir -p "$SECRETS"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=image-test CA" \
  -keyout "$SECRETS/ca.key" -out "$SECRETS/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$SECRETS/tls.key" -out "$SECRETS/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$SECRETS/ext.cnf"
openssl x509 -req -in "$SECRETS/tls.csr" -CA "$SECRETS/ca.crt" -CAkey "$SECRETS/ca.key" -CAcreateserial \
  -days 1 -extfile "$SECRETS/ext.cnf" -out "$SECRETS/tls.crt" 2>/dev/null
openssl rand -hex 32 >"$SECRETS/token"
chmod 0755 "$SECRETS" && chmod 0644 "$SECRETS"/*  # readable by the image's user (test material only)

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GRPC_PORT=$(free_port) METRICS_PORT=$(free_port) HEALTH_PORT=$(free_port)
SERVE_ARGS=(--weights random --models alexnet --host 127.0.0.1 --grpc-port "$GRPC_PORT"
  --metrics-port "$METRICS_PORT" --health-port "$HEALTH_PORT" --drain-seconds 10)

# -- start: a container, or the image's filesystem under chroot ---------------------------------
MODE=""
log "starting a container"
if CONTAINER=$("$ENGINE" run -d --network host --user 10001:10001 \
    -v "$SECRETS:/etc/vision/secrets:ro" \
    -e VISION_SERVE_AUTH_TOKEN_FILE=/etc/vision/secrets/token \
    -e VISION_SERVE_TLS_CERT_FILE=/etc/vision/secrets/tls.crt \
    -e VISION_SERVE_TLS_KEY_FILE=/etc/vision/secrets/tls.key \
    "$IMAGE" "${SERVE_ARGS[@]}" 2>"$WORK/run.err"); then
  sleep 3
  if [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" = true ]; then
    MODE=container
  else
    "$ENGINE" logs "$CONTAINER" >"$WORK/run.err" 2>&1 || true
    "$ENGINE" rm -f "$CONTAINER" >/dev/null 2>&1 || true
  fi
fi
if [ -z "$MODE" ]; then
  CONTAINER=""
  echo "a container cannot start here: $(tail -3 "$WORK/run.err" | tr '\n' ' ')"
  [ "$(id -u)" = 0 ] || fail "running the image's filesystem with chroot needs root"
  log "running the image's filesystem directly: chroot as the image's user, with its environment"
  MODE=chroot
  MNT=$("$ENGINE" image mount "$IMAGE")
  mount -t tmpfs -o size=1g,mode=1777 tmpfs "$MNT/tmp" && MOUNTS+=("$MNT/tmp")
  mount -t proc proc "$MNT/proc" && MOUNTS+=("$MNT/proc")
  mount --rbind /dev "$MNT/dev" && MOUNTS+=("$MNT/dev")
  mount --rbind -o ro /sys "$MNT/sys" 2>/dev/null && MOUNTS+=("$MNT/sys") || true
  mkdir -p "$MNT/tmp/secrets" && cp "$SECRETS"/{token,tls.crt,tls.key} "$MNT/tmp/secrets/"
  chmod 0755 "$MNT/tmp/secrets" && chmod 0644 "$MNT/tmp/secrets"/*
  user=$("$ENGINE" image inspect -f '{{.Config.User}}' "$IMAGE")
  workdir=$("$ENGINE" image inspect -f '{{.Config.WorkingDir}}' "$IMAGE")
  mapfile -t image_env < <("$ENGINE" image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
  mapfile -t entrypoint < <("$ENGINE" image inspect -f '{{range .Config.Entrypoint}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
  echo "user $user, workdir $workdir, entrypoint ${entrypoint[*]}, env: ${image_env[*]}"
  # The image's root is read-only here, as in the Deployment: the store goes to /tmp.
  env -i "${image_env[@]}" \
    VISION_SERVE_AUTH_TOKEN_FILE=/tmp/secrets/token \
    VISION_SERVE_TLS_CERT_FILE=/tmp/secrets/tls.crt \
    VISION_SERVE_TLS_KEY_FILE=/tmp/secrets/tls.key \
    VISION_SERVE_MODEL_STORE=/tmp/models HOME=/tmp \
    chroot --userspec="$user" "$MNT" /bin/sh -c 'cd "$0" && exec "$@"' "$workdir" \
    "${entrypoint[@]}" "${SERVE_ARGS[@]}" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
fi

server_log() { if [ "$MODE" = container ]; then "$ENGINE" logs "$CONTAINER" 2>&1; else cat "$WORK/server.log"; fi; }

# -- checks, from outside the image with the SDK -------------------------------------------------
log "checking health, inference and a refused management call ($MODE)"
if ! PYTHONPATH="$ROOT/clients/python${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$GRPC_PORT" "$HEALTH_PORT" "$SECRETS" <<'EOF'
import io, sys, time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from vision_client import AuthenticationError, Client

port, health_port, secrets = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
target, ca, token = f"127.0.0.1:{port}", secrets / "ca.crt", (secrets / "token").read_text().strip()

deadline = time.monotonic() + 300
with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:  # what the kubelet's probe does
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == 1:
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            sys.exit("not SERVING after 300 s")
        time.sleep(1)
print("health (plaintext health port): SERVING")

with Client(target, root_certificates=ca, timeout=60) as client:
    print("ready over TLS:", client.ready())
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 120, 40)).save(buffer, format="PNG")
    [predictions] = client.classify(buffer.getvalue(), model="alexnet", top_k=3)
    assert len(predictions) == 3, predictions
    print("inference over TLS:", [(p.label, round(p.score, 4)) for p in predictions])
    try:
        client.delete_model("nothing-here")
    except AuthenticationError as error:
        print("management call without the token refused:", error)
    else:
        sys.exit("a management call without the token was accepted")

with Client(target, root_certificates=ca, token=token, timeout=30) as client:
    print("management call with the token:", [job.id for job in client.jobs()])

with grpc.insecure_channel(target) as channel:  # plaintext against the TLS port
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as error:
        print("plaintext client against the TLS port:", error.code().name)
    else:
        sys.exit("the TLS port answered a plaintext client")
EOF
then
  server_log | tail -40
  fail "checks"
fi

# -- SIGTERM -------------------------------------------------------------------------------------
log "stopping with SIGTERM"
if [ "$MODE" = container ]; then
  "$ENGINE" stop -t 40 "$CONTAINER" >/dev/null
  rc=$("$ENGINE" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
else
  kill -TERM "$SERVER_PID"
  rc=0
  wait "$SERVER_PID" || rc=$?
  SERVER_PID=""
fi
server_log | tail -8
[ "$rc" = 0 ] || fail "exit code $rc after SIGTERM"
log "image-test passed ($MODE): health, inference over TLS, management refused without the token, exit 0 on SIGTERM"
