# syntax=docker/dockerfile:1
#
# ntm-serve: the few-shot NTM service with the shipped model, as a small CPU image.
#
#   docker build -t ntm-fewshot .                                   # CPU torch (default)
#   docker build -t ntm-fewshot:cuda --build-arg TORCH_VARIANT=cu128 .  # CUDA torch
#   docker run --rm -p 8000:8000 -p 8001:8001 ntm-fewshot        # HTTP on 8000, gRPC on 8001
#
# Build arguments:
#   PYTHON_VERSION  the python:<version>-slim base of both stages (default 3.11)
#   TORCH_VERSION   the torch release to install (default 2.13.0, the version `make` installs)
#   TORCH_VARIANT   which of PyTorch's wheel indexes torch comes from: "cpu" (default, no CUDA
#                   libraries: the small image) or a CUDA tag that PyTorch publishes for
#                   TORCH_VERSION, e.g. cu126 or cu128 (several GB more; run with
#                   `--gpus all -e NTM_DEVICE=cuda`, needs the NVIDIA container toolkit)
#   TORCH_INDEX     the pip index for torch; defaults to PyTorch's index for TORCH_VARIANT
#                   (point it at a mirror to build without reaching PyTorch's servers)
#
# Configuration is by NTM_* environment variables (service/settings.py), e.g.
#   docker run -e NTM_STORE=redis://redis:6379/0 -e NTM_WORKERS=2 ...
# Any ntm-serve flag can also follow the image name: docker run ntm-fewshot --log-level debug
#
# tests/deploy/test_docker_files.py replays the builder stage on the host (a fresh venv, these
# COPY and RUN lines, torch from the local wheel) and starts the installed ntm-serve: keep the
# builder stage to ARG, ENV, WORKDIR, COPY and shell-form RUN lines that reach the venv through
# ${VIRTUAL_ENV} rather than a literal /opt/venv (the replay puts it elsewhere).

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------- builder
FROM python:${PYTHON_VERSION}-slim AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}"

RUN python -m venv "${VIRTUAL_ENV}"

# torch first, from the variant's own index, so that the project's `torch>=2.2` is already
# met and pip never pulls the (CUDA-bundling) default wheel from PyPI.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# The project itself, as a regular (non-editable) install: models/pretrained/ (config.json,
# model.safetensors) is package data, so the shipped model lands in site-packages.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
    && pip check

# Drop what torch ships for building C++ extensions and for its own C++ tests (about 150 MB):
# nothing here compiles. The image serves eagerly (NTM_COMPILE=0 below): TorchInductor's CPU
# graphs need these headers and a C++ compiler at start-up (a warm-up without a filled cache
# takes 29 s on two cores; docs/operations.md, "Compiled steps").
RUN rm -rf "${VIRTUAL_ENV}"/lib/python*/site-packages/torch/include \
           "${VIRTUAL_ENV}"/lib/python*/site-packages/torch/test

# ---------------------------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim AS runtime

LABEL org.opencontainers.image.title="ntm-fewshot" \
      org.opencontainers.image.description="Few-shot character recognition served over HTTP by a Neural Turing Machine"

RUN useradd --system --create-home --home-dir /home/ntm --uid 10001 --user-group --shell /usr/sbin/nologin ntm

ENV VIRTUAL_ENV=/opt/venv
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    NTM_HOST=0.0.0.0 \
    NTM_PORT=8000 \
    NTM_GRPC_PORT=8001 \
    NTM_STORE=memory:// \
    NTM_WORKERS=1 \
    NTM_DEVICE=cpu \
    NTM_COMPILE=0 \
    NTM_LOG_LEVEL=info

# Owned by root, read-only for the service user.
COPY --from=builder ${VIRTUAL_ENV} ${VIRTUAL_ENV}

USER 10001:10001
WORKDIR /home/ntm
# HTTP (/v1, /v2 REST) and the Open Inference Protocol over gRPC (Triton's ports).
EXPOSE 8000 8001

# Liveness: the process answers. Python's urllib, as the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NTM_PORT', '8000') + '/healthz', timeout=4)"]

ENTRYPOINT ["ntm-serve"]
