#!/bin/sh
# Container start.
#   serve (default): check the key and certificate files, wait (bounded) for PostgreSQL and
#     Redis, apply migrations (under an advisory lock; MIGRATE_ON_START=false skips it), then
#     exec the server on BIND (TLS) and PROXY_BIND (plain HTTP, if set) with WORKERS
#     processes. BIND set empty: PROXY_BIND alone, behind a TLS-terminating ingress.
#   migrate: wait for the backends, apply migrations, exit.
#   anything else: python -m service ARGS (users, clients, keys, ...).
# DATABASE_URL, REDIS_URL, SECRET_KEY, SECRET_KEY_FALLBACKS, JWT_SECRET and
# JWT_SECRET_FALLBACKS may instead be given as files:
# DATABASE_URL_FILE=/run/secrets/database_url and so on.
set -eu

fail() {
    echo "authsvc: $*" >&2
    exit 2
}

# Prints the reason a file cannot be read (as cat says it), or nothing when it can.
unreadable() {
    if reason=$(cat -- "$1" 2>&1 >/dev/null); then
        return 1
    fi
    echo "${reason##*: }"
}

load_secret_files() {
    for name in DATABASE_URL REDIS_URL SECRET_KEY SECRET_KEY_FALLBACKS JWT_SECRET JWT_SECRET_FALLBACKS; do
        eval "file=\${${name}_FILE:-} given=\${${name}+set}"
        [ -n "$file" ] || continue
        [ -z "$given" ] || fail "set $name or ${name}_FILE, not both"
        if reason=$(unreadable "$file"); then
            fail "cannot read ${name}_FILE $file: $reason"
        fi
        value=$(cat -- "$file")
        export "$name=$value"
        unset "${name}_FILE"
    done
}

# The server would find these only after the wait and the migrations: say it at once.
check_key_files() {
    for name in TLS_CERT_FILE TLS_KEY_FILE JWT_PRIVATE_KEY_FILE JWT_PUBLIC_KEY_FILE; do
        eval "file=\${${name}:-}"
        [ -n "$file" ] || continue
        if reason=$(unreadable "$file"); then
            fail "cannot read $name $file: $reason"
        fi
    done
}

migrate_on_start() {
    case "${MIGRATE_ON_START:-true}" in
        true | 1 | yes) return 0 ;;
        false | 0 | no) return 1 ;;
        *) fail "MIGRATE_ON_START must be true or false, not '$MIGRATE_ON_START'" ;;
    esac
}

load_secret_files
command=${1:-serve}
[ "$#" -eq 0 ] || shift
case "$command" in
    serve)
        check_key_files
        migrate=false
        if migrate_on_start; then migrate=true; fi
        python -m service wait --timeout "${WAIT_TIMEOUT:-60}"
        if [ "$migrate" = true ]; then python -m service migrate; fi
        if [ -n "${BIND-0.0.0.0:8443}" ]; then
            set -- --bind "${BIND-0.0.0.0:8443}" "$@"
        else
            [ -n "${PROXY_BIND:-}" ] || fail "BIND is empty: set PROXY_BIND (behind an ingress) or BIND"
            set -- --proxy-only "$@"
        fi
        exec python -m service serve --workers "${WORKERS:-2}" "$@"
        ;;
    migrate)
        python -m service wait --timeout "${WAIT_TIMEOUT:-60}"
        exec python -m service migrate "$@"
        ;;
    *)
        exec python -m service "$command" "$@"
        ;;
esac
