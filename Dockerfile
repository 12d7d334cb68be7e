# idempotent-worker container image.
#   docker build -t idempotent-worker .
#   docker run --read-only -e WORKER_KAFKA__BOOTSTRAP_SERVERS=... -e WORKER_REDIS__URL=... \
#     -v ./worker.toml:/etc/idempotent-worker/worker.toml:ro idempotent-worker
# Configuration: the TOML file at $WORKER_CONFIG, overridden by WORKER_* variables.
# Handlers: put your package under /app (e.g. in an image built FROM this one); /app is the
# working directory, which is on the import path. The example
# idempotent_worker.examples.orders is installed with the package.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY idempotent_worker ./idempotent_worker
# Wheels only: confluent-kafka and the rest ship binary wheels, so no compiler is needed.
# The postgres extra (psycopg) lets mounted handlers use ctx.inbox(conn).
RUN /opt/venv/bin/pip install --only-binary=:all: --no-compile ".[postgres]" \
    && /opt/venv/bin/python -m compileall -q /opt/venv

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home --shell /usr/sbin/nologin worker
COPY --from=build /opt/venv /opt/venv
COPY config/worker.toml /etc/idempotent-worker/worker.toml
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WORKER_CONFIG=/etc/idempotent-worker/worker.toml \
    WORKER_HTTP__HOST=0.0.0.0 \
    WORKER_HTTP__PORT=8080
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['WORKER_HTTP__PORT']}/healthz\", timeout=2)"]
ENTRYPOINT ["idempotent-worker", "run"]
