# The service image: dependencies from the hashed lockfiles in requirements/, run as an
# unprivileged user. BASE_IMAGE must provide python3.11 (with venv); pin it by digest for a
# reproducible build: --build-arg BASE_IMAGE=python:3.11-slim@sha256:<digest>
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# PEM certificates to trust, in this stage only, when a TLS-inspecting proxy stands between
# the build and the package index.
ARG EXTRA_CA_CERTS=""
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" >> /etc/ssl/certs/ca-certificates.crt; fi
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
WORKDIR /src
COPY requirements/runtime.txt requirements/build.txt requirements/
# /opt/build holds the build tools; /opt/venv, copied into the final image, only the runtime.
RUN python3.11 -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes -r requirements/build.txt \
 && python3.11 -m venv --without-pip /opt/venv \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --require-hashes \
        -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY service ./service
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist . \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps /tmp/dist/*.whl

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 authsvc \
 && useradd --system --uid 10001 --gid authsvc --home-dir /var/lib/authsvc --no-create-home \
        --shell /usr/sbin/nologin authsvc \
 && install -d -o authsvc -g authsvc -m 0700 /var/lib/authsvc
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY hypercorn.toml ./
COPY docker/entrypoint.sh /usr/local/bin/authsvc-entrypoint
COPY docker/healthcheck.py /usr/local/bin/authsvc-healthcheck
# BIND and WORKERS are read by the entrypoint and BIND by the health check, so both follow it;
# so does PROXY_BIND (plain HTTP for an ingress; with BIND set empty, the only listener).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    SERVICE_ENV=production HYPERCORN_CONFIG=/app/hypercorn.toml INSTANCE_DIR=/var/lib/authsvc \
    BIND=0.0.0.0:8443 WORKERS=2
# Set at run time (see README, "In production"): DATABASE_URL, REDIS_URL, SECRET_KEY,
# JWT_SECRET, TLS_CERT_FILE, TLS_KEY_FILE, and JWT_ISSUER (the service's https URL).
# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8443
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["authsvc-healthcheck"]
ENTRYPOINT ["authsvc-entrypoint"]
CMD ["serve"]
