# crm-pulse worker image: `docker build -t crm-pulse .`; see docs/operations.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the package from a throw-away copy of the source, so the image runs the installed code only.
COPY pyproject.toml README.md /tmp/crm-pulse/
COPY crm_pulse /tmp/crm-pulse/crm_pulse
COPY streams /tmp/crm-pulse/streams
COPY agents /tmp/crm-pulse/agents
COPY schemas /tmp/crm-pulse/schemas
RUN cd /tmp/crm-pulse \
    && pip install . \
    && cd / \
    && rm -rf /tmp/crm-pulse

# Non-root user with a writable working directory and Faust data directory.
RUN groupadd --system --gid 10001 crm-pulse \
    && useradd --system --uid 10001 --gid crm-pulse --home-dir /home/crm-pulse --create-home \
       --shell /usr/sbin/nologin crm-pulse \
    && mkdir -p /app/data \
    && chown -R crm-pulse:crm-pulse /app
WORKDIR /app

ENV CRM_PULSE_DATA_DIR=/app/data \
    CRM_PULSE_METRICS_HOST=0.0.0.0 \
    CRM_PULSE_METRICS_PORT=6066

USER 10001:10001
EXPOSE 6066

# No curl in the slim image: the health check uses Python's urllib (any error or HTTP status >= 400 fails it).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CRM_PULSE_METRICS_PORT', '6066') + '/metrics', timeout=4)"]

CMD ["crm-pulse", "worker"]
