# wyoming-tinyalign as a container: the Wyoming server on port 10300, data (models, log) in /data.
#
# CPU (default):
#   docker build -t wyoming-tinyalign .
# NVIDIA Jetson (JetPack 6): a base image that already has CUDA PyTorch and Python >= 3.11, e.g.
#   docker build -t wyoming-tinyalign:jetson \
#     --build-arg BASE_IMAGE=dustynv/pytorch:2.6-r36.4.0-cu128-24.04 --build-arg DEVICE=cuda .
# (the Ubuntu 22.04 l4t-pytorch r36 images have Python 3.10, which is too old). The server then runs
# with --device cuda in half precision. When the base image can import torch, torch is not installed
# again; otherwise the CPU wheel comes from TORCH_INDEX_URL.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv --system-site-packages /opt/venv \
    || { apt-get update && apt-get install -y --no-install-recommends python3-venv \
         && python3 -m venv --system-site-packages /opt/venv; }
RUN if /opt/venv/bin/python3 -c "import torch" 2>/dev/null; then \
        echo "using the base image's torch"; \
    else \
        /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml README.md /src/
COPY wyoming_tinyalign /src/wyoming_tinyalign
RUN /opt/venv/bin/pip install /src

FROM ${BASE_IMAGE}
ARG DEVICE=cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10300 --user-group --create-home tinyalign \
    && mkdir -p /data \
    && chown tinyalign:tinyalign /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/huggingface \
    XDG_CACHE_HOME=/data/cache \
    WYOMING_TINYALIGN_DEVICE=${DEVICE}
USER tinyalign
VOLUME /data
EXPOSE 10300
# A real describe -> info round trip. The first start may build the demo model (56 minutes on 2 cores
# here, hours on a Raspberry Pi): while the server builds it in /data, the check passes.
HEALTHCHECK --start-period=60m --interval=30s --timeout=10s --retries=3 \
    CMD ["python3", "-m", "wyoming_tinyalign.healthcheck", "--uri", "tcp://127.0.0.1:10300", "--timeout", "5", "--data-dir", "/data"]
ENTRYPOINT ["wyoming-tinyalign", "serve"]
CMD ["--uri", "tcp://0.0.0.0:10300", "--data-dir", "/data"]
