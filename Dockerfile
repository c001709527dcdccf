# syntax=docker/dockerfile:1
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install .

FROM python:3.11-slim
RUN groupadd --system authsvc && useradd --system --gid authsvc --home /app authsvc
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY hypercorn.toml ./
COPY docker/entrypoint.sh /usr/local/bin/authsvc-entrypoint
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    SERVICE_ENV=production HYPERCORN_CONFIG=/app/hypercorn.toml INSTANCE_DIR=/tmp/authsvc
# Set at run time (see README, "In production"): DATABASE_URL, REDIS_URL, SECRET_KEY,
# JWT_SECRET, TLS_CERT_FILE, TLS_KEY_FILE, and JWT_ISSUER (the service's https URL).
USER authsvc
EXPOSE 8443
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import ssl,urllib.request as u; u.urlopen('https://127.0.0.1:8443/healthz', context=ssl._create_unverified_context(), timeout=2)" || exit 1
ENTRYPOINT ["authsvc-entrypoint"]
