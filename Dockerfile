# syntax=docker/dockerfile:1
# The gateway image: the builder installs the package and its pinned dependencies
# (constraints.txt) into a venv; the final image is python:3.11-slim with only that venv,
# run as a non-root user. The config is mounted at /etc/gateway/config.yaml.
#
#   docker build -t gateway .
#   docker run -p 8080:8080 -v "$PWD/config.yaml:/etc/gateway/config.yaml:ro" -e OPENAI_API_KEY gateway
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Everything the wheel is built from (README.md is the package's readme); .dockerignore keeps
# tests, benchmarks, local venvs and configs out of the context.
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
# Binary wheels exist for every compiled dependency (uvloop, httptools, hiredis, msgspec,
# orjson) on amd64 and arm64, so no compiler is needed. A regular (non-editable) install: the
# package and its data files land in the venv's site-packages.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt . \
    && python -c "import gateway.app" \
    && pip uninstall -y -q pip setuptools

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8080
# No curl in slim: Python's urllib. Any error (refused, timeout, non-2xx) exits 1 = unhealthy.
# Set GATEWAY_HEALTHCHECK_URL when server.port is not 8080.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(os.environ.get('GATEWAY_HEALTHCHECK_URL', 'http://127.0.0.1:8080/healthz'), timeout=2).close()"]
# uvicorn finishes in-flight requests on SIGTERM (up to 30 s): give it that long to stop.
STOPSIGNAL SIGTERM
CMD ["gateway", "serve", "--config", "/etc/gateway/config.yaml", "--host", "0.0.0.0"]
