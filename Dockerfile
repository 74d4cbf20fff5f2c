# One image for every meshserve service; the command picks the service:
#
#   docker run IMAGE gateway|batcher|worker|cache [flags]    (or MESHSERVE_* env variables)
#
# Build (from the repository root):
#
#   docker build -t meshserve:0.1.0-cpu --build-arg VARIANT=cpu .
#   docker build -t meshserve:0.1.0-gpu --build-arg VARIANT=gpu .
#   docker build -t meshserve-models:0.1.0 --target models .   # the model repository alone
#
# VARIANT selects the torch wheel. cpu: the CPU-only wheel from the PyTorch CPU index (no CUDA
# libraries, ~10x smaller). gpu: the CUDA wheel from the PyTorch CUDA index (TORCH_CUDA, e.g.
# cu128). The CUDA runtime, cuBLAS and cuDNN then come as pip wheels (nvidia-*), pinned exactly by
# torch's own metadata, so both variants share one slim Python base and no CUDA base image is
# needed: the node supplies only the NVIDIA driver, which the NVIDIA container toolkit / device
# plugin mounts into pods that request nvidia.com/gpu. Pick a TORCH_CUDA that the index publishes
# for TORCH_VERSION and that the nodes' driver supports.
#
# The model repository is not in this image: pods mount it at /models (a volume, or the `models`
# target below copied into an emptyDir by an init container; see deploy/k8s/README.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG MODELS_BASE_IMAGE=busybox:1.37

# ---------------------------------------------------------------------------------------------
# builder: locked requirements, torch and the meshserve package in a venv at /opt/venv.
FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# Everything except torch, exact versions (torch's pure-Python dependencies included).
COPY requirements/runtime.txt /tmp/requirements/runtime.txt
RUN pip install --require-virtualenv -r /tmp/requirements/runtime.txt

# torch from the index of the variant, with nothing else taken from that index: its
# dependencies above are already satisfied; on gpu the nvidia-* and triton wheels torch pins.
RUN case "${VARIANT}" in \
      cpu) index="https://download.pytorch.org/whl/cpu" ;; \
      gpu) index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
      *) echo "VARIANT must be cpu or gpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && pip install --require-virtualenv --index-url "${index}" "torch==${TORCH_VERSION}"

# The package itself, without resolving anything again; pip check fails the build on any
# requirement of pyproject.toml that the locked set does not satisfy.
COPY pyproject.toml README.md /src/
COPY services /src/services
RUN pip install --require-virtualenv --no-deps --no-build-isolation /src \
 && pip check \
 && python -c "import meshserve.cli, torch; print('meshserve on torch', torch.__version__)"

# ---------------------------------------------------------------------------------------------
# models: the model repository alone, for an init container that copies it into an emptyDir:
#   cp -R /models/. /mnt/models/      (deploy/k8s/components/models-from-image)
FROM ${MODELS_BASE_IMAGE} AS models
COPY models/ /models/
USER 10001:10001
CMD ["cp", "-R", "/models/.", "/mnt/models/"]

# ---------------------------------------------------------------------------------------------
# runtime (the default target): the venv on the same slim base, no compilers, non-root.
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="meshserve" \
      org.opencontainers.image.description="meshserve inference mesh (gateway, batcher, worker, cache)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.meshserve.variant="${VARIANT}"
RUN groupadd --system --gid 10001 meshserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin meshserve \
 && mkdir /models
COPY --from=builder /opt/venv /opt/venv
# The root filesystem is read-only in Kubernetes: every cache and scratch path points into
# /tmp (an emptyDir there). NVIDIA_DRIVER_CAPABILITIES asks the container toolkit for the
# compute libraries on GPU nodes (ignored elsewhere).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    CUDA_CACHE_PATH=/tmp/.cache/nv \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MESHSERVE_MODEL_REPOSITORY=/models
USER 10001:10001
# gRPC and metrics ports: gateway, batcher, model worker, cache.
EXPOSE 8000 8001 8002 8011 8012 8021 8022 8031 8032
# meshserve is PID 1: each service handles SIGTERM itself (NOT_SERVING, drain, exit), and it
# starts no child processes, so no init process is needed.
ENTRYPOINT ["meshserve"]
CMD ["--help"]
