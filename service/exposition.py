"""Serving the metrics: where they are read from, and on which port.

`serve` makes a directory for this run's metric files before it starts any worker
(prometheus-client's multiprocess mode: each process writes its own file, and a scrape
sums them), tells the library about a worker that died, and removes the directory when
the service stops. The metrics are served:

- by the master on METRICS_BIND, plain HTTP, meant for a private address (127.0.0.1:9464,
  or a pod's address that only the cluster's scraper reaches): one listener that answers
  for every worker, whichever of them live;
- with METRICS_PUBLIC=true, also at GET /metrics on the service's own port, to requests
  that present METRICS_TOKEN as a bearer token (compared in constant time).

Neither is on by default: the public port answers GET /metrics with 404.
"""

from __future__ import annotations

import hmac
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service import metrics
from service.config import Settings
from service.errors import problem
from service.isolation import no_database

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)


class MetricsListenerError(RuntimeError):
    """METRICS_BIND cannot be listened on; the message says why, in one line."""


def registry() -> CollectorRegistry:
    """What a scrape reads: every worker's files under `serve`, else this process's values.

    This process's own tally is flushed first; other workers' reach their files within
    metrics.FLUSH_SECONDS.
    """
    metrics.TALLY.flush()
    path = os.environ.get(MULTIPROCESS_DIR)
    if not path:
        return REGISTRY
    summed = CollectorRegistry()
    MultiProcessCollector(summed, path=path)  # type: ignore[no-untyped-call]
    return summed


@contextmanager
def run_metrics(settings: Settings) -> Iterator[None]:
    """For one run of the service: the metric files' directory, and the private listener."""
    path = tempfile.mkdtemp(prefix="authsvc-metrics-")
    # Workers start after this: each of them writes its metrics under path.
    os.environ[MULTIPROCESS_DIR] = path
    listener = None
    try:
        address = settings.metrics_address
        if address is not None:
            host, port = address
            try:
                listener, _ = start_http_server(port, addr=host, registry=registry())
            except OSError as exc:
                raise MetricsListenerError(
                    f"cannot listen on METRICS_BIND {settings.metrics_bind}: {exc.strerror or exc}"
                ) from None
            log.info("metrics on http://%s/metrics", settings.metrics_bind)
        yield
    finally:
        if listener is not None:
            listener.shutdown()
            listener.server_close()
        os.environ.pop(MULTIPROCESS_DIR, None)
        shutil.rmtree(path, ignore_errors=True)


def process_ended(pid: int | None) -> None:
    """Drop a dead worker's live gauges (its counts stay in the sums, as counts must)."""
    path = os.environ.get(MULTIPROCESS_DIR)
    if path and pid is not None:
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def init_app(app: Flask, settings: Settings) -> None:
    """Serve GET /metrics on the app's port, only when METRICS_PUBLIC says so."""
    if settings.metrics_public:
        app.register_blueprint(bp)


@bp.get("/metrics")
@no_database
def metrics_page() -> Response:
    """Every worker's metrics, in Prometheus's text format, to the holder of METRICS_TOKEN."""
    settings: Settings = current_app.extensions["settings"]
    expected = f"Bearer {settings.metrics_token}".encode()
    given = request.headers.get("Authorization", "").encode()
    if not settings.metrics_token or not hmac.compare_digest(given, expected):
        return problem(
            401,
            "The metrics need the bearer token METRICS_TOKEN.",
            headers={"WWW-Authenticate": 'Bearer realm="authsvc-metrics"'},
        )
    response = Response(generate_latest(registry()), mimetype=CONTENT_TYPE_LATEST)
    response.headers["Cache-Control"] = "no-store"
    return response
