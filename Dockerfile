# syntax=docker/dockerfile:1
#
# vision-serving image: `vision-serve` with pretrained weights baked in.
#
#   CPU (default; CPU-only torch, much smaller):
#     docker build -t vision-serving:0.1.0 .
#   CUDA (torch from PyPI is the CUDA build and brings its CUDA libraries as wheels;
#   the node's driver is mounted in by the NVIDIA container toolkit):
#     docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t vision-serving:0.1.0-cuda .
#   Without baked weights (mount TORCH_HOME or pass --weights at run time):
#     docker build --build-arg FETCH_WEIGHTS=0 -t vision-serving:0.1.0-noweights .
#   Only some models (their weights are fetched, and they are what the image serves by default):
#     docker build --build-arg MODELS=resnet101 -t vision-serving:0.1.0-resnet101 .
#
# Both stages must use the same Python image: the virtualenv is copied from one to the other.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Where torch and torchvision come from; the versions are pyproject.toml's pins.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG FETCH_WEIGHTS=1
ARG MODELS=alexnet,vgg16,resnet101

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    TORCH_HOME=/opt/torch

RUN python -m venv /opt/venv

WORKDIR /src

# torch and torchvision first, in their own layer, so that a source change does not refetch them.
COPY pyproject.toml ./
RUN set -eu; \
    pins="$(python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; pins = [d for d in deps if d.split("==")[0].strip() in ("torch", "torchvision")]; assert len(pins) == 2, f"torch and torchvision must be pinned with == in pyproject.toml: {deps}"; print(*pins)')"; \
    echo "installing ${pins} from ${TORCH_INDEX}"; \
    pip install --index-url "${TORCH_INDEX}" ${pins}

# The SDK (the generated stubs live there) and the server, as regular (non-editable) installs.
COPY . .
RUN pip install ./clients/python . && pip check

# Pretrained weights into TORCH_HOME (hub/checkpoints); an empty directory when turned off.
RUN set -eu; mkdir -p "${TORCH_HOME}"; \
    if [ "${FETCH_WEIGHTS}" = "1" ]; then vision-serve fetch-weights --models "${MODELS}"; \
    else echo "FETCH_WEIGHTS=${FETCH_WEIGHTS}: no weights baked in"; fi

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG MODELS=alexnet,vgg16,resnet101

LABEL org.opencontainers.image.title="vision-serving" \
      org.opencontainers.image.description="gRPC serving of torchvision classifiers over the Open Inference Protocol" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 vision \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/vision --create-home \
      --shell /usr/sbin/nologin vision \
 && mkdir -p /var/lib/vision/models \
 && chown 10001:10001 /var/lib/vision/models

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/torch /opt/torch

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/torch \
    VISION_SERVE_HOST=0.0.0.0 \
    VISION_SERVE_GRPC_PORT=8001 \
    VISION_SERVE_HTTP_PORT=8000 \
    VISION_SERVE_METRICS_PORT=8002 \
    VISION_SERVE_MODELS=${MODELS} \
    VISION_SERVE_MODEL_STORE=/var/lib/vision/models

VOLUME ["/var/lib/vision/models"]
EXPOSE 8000 8001 8002
USER 10001:10001
WORKDIR /home/vision

# vision-serve handles SIGTERM itself: health turns NOT_SERVING, in-flight requests are answered
# (up to VISION_SERVE_DRAIN_SECONDS, default 25), then it exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vision-serve"]
