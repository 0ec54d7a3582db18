# syntax=docker/dockerfile:1
# fetcher container image.
#
#   docker build -t fetcher .
#   docker run --rm -v "$PWD:/data" fetcher run /data/jobs.jsonl -o /data/out.jsonl
#
# BASE is any image with Python >= 3.11 (python3 with the venv module) on a Debian-like system;
# the default is the official slim image.
ARG BASE=python:3.12-slim

# ---- build: wheels of the project and of every dependency, then a venv installed from them only
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/fetcher
WORKDIR /src
# Dependency wheels first, so this layer is reused until pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/fetcher/bin/pip wheel --wheel-dir /wheels -r /tmp/requirements.txt
COPY fetcher/ fetcher/
RUN /opt/fetcher/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/fetcher/bin/pip install --no-index --find-links /wheels fetcher \
 && /opt/fetcher/bin/pip check \
 && /opt/fetcher/bin/pip uninstall -y pip setuptools \
 && /opt/fetcher/bin/fetcher --version

# ---- final: the base image plus the venv; no compilers, wheels, pip caches, sources or tests
FROM ${BASE}
LABEL org.opencontainers.image.title="fetcher" \
      org.opencontainers.image.description="High-concurrency batch fetcher: HTTP and mail jobs, one JSON result line per job" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/fetcher/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 fetcher \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin fetcher \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /opt/fetcher /opt/fetcher
WORKDIR /data
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# fetcher drains in-flight jobs on SIGTERM (shutdown_grace, default 10 s) and exits 143.
STOPSIGNAL SIGTERM
# Batch runs (no FETCHER_METRICS_PORT): always healthy. Worker mode with FETCHER_METRICS_PORT set:
# GET /healthz on that port must answer 2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; p = os.environ.get('FETCHER_METRICS_PORT'); p and urllib.request.urlopen(f'http://127.0.0.1:{p}/healthz', timeout=4)"]
ENTRYPOINT ["fetcher"]
CMD ["--help"]
