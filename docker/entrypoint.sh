#!/bin/sh
# Container start: wait (bounded) for PostgreSQL and Redis, apply migrations, then serve.
set -eu
python -m service wait --timeout "${WAIT_TIMEOUT:-60}"
python -m service migrate
exec python -m service serve --bind "${BIND:-0.0.0.0:8443}" --workers "${WORKERS:-2}" "$@"
