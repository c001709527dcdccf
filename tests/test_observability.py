"""Metrics, request ids, JSON logs and audit events, on a real server with two workers."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.access import request_id
from service.config import Settings
from service.logs import JsonFormatter, TextFormatter
from service.metrics import REQUEST_BUCKETS, Tally
from service.store.migrate import upgrade
from tests.conftest import (
    delete_prefix,
    fresh_database,
    make_settings,
    serve_in_process,
    settings_beside,
)
from tests.oauth_helpers import REDIRECT, authorize_url, bearer, pkce, query_of, sign_in_and_consent
from tests.observability_helpers import audit_lines, command, log_lines, scrape, value
from tests.servers import (
    RunningServer,
    free_port,
    launch_server,
    server_env,
    start_server,
    wait_until_gone,
    wait_until_listening,
)

WORKERS = 2
PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new horse battery"
HEALTHZ = {"route": "/healthz", "method": "GET", "status": "200"}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Observed:
    """The module's server and where its master serves the metrics."""

    server: RunningServer
    metrics_url: str


@pytest.fixture(scope="module")
def observed(
    postgres_server: str, redis_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Observed]:
    """Two workers on a database and Redis prefix of their own, logging JSON at DEBUG."""
    tmp = tmp_path_factory.mktemp("observed")
    prefix = f"authsvc-test:{uuid.uuid4().hex[:12]}:"
    with fresh_database(postgres_server) as url:
        settings = make_settings(tmp, database_url=url, redis_url=redis_server, redis_prefix=prefix)
        upgrade(settings)
        port = free_port()
        env = {
            **server_env(settings, tmp),
            "METRICS_BIND": f"127.0.0.1:{port}",
            "LOG_LEVEL": "DEBUG",
            "LOGIN_FAILURES_PER_PAIR": "2",
        }
        server = start_server(env, workers=WORKERS, log_dir=tmp)
        try:
            wait_until_listening(server, WORKERS)
            yield Observed(server, f"http://127.0.0.1:{port}/metrics")
        finally:
            assert server.stop() == 0, server.log()
            delete_prefix(redis_server, prefix)


def healthz_on_new_connections(server: RunningServer, at_least: int) -> dict[int, int]:
    """GET /healthz on new connections until every worker answered some; count per worker pid."""
    served: dict[int, int] = {}
    while len(served) < WORKERS or sum(served.values()) < at_least:
        assert sum(served.values()) < 200, f"workers that answered: {served}"
        with httpx.Client(base_url=server.url, verify=False, http2=True) as http:
            response = http.get("/healthz")
        assert response.status_code == 200
        pid = int(response.json()["worker"])
        served[pid] = served.get(pid, 0) + 1
    return served


def test_request_counts_add_up_across_workers(observed: Observed) -> None:
    before = scrape(observed.metrics_url)
    served = healthz_on_new_connections(observed.server, at_least=20)
    after = scrape(observed.metrics_url)
    answered = sum(served.values())
    counted = value(after, "authsvc_http_requests_total", **HEALTHZ) - value(
        before, "authsvc_http_requests_total", **HEALTHZ
    )
    assert counted == answered, served
    timed = "authsvc_http_request_duration_seconds_count"
    route = {"route": "/healthz", "method": "GET"}
    assert value(after, timed, **route) - value(before, timed, **route) == answered
    assert value(after, "authsvc_workers") == WORKERS


def test_metrics_are_not_on_the_public_port(observed: Observed) -> None:
    with httpx.Client(base_url=observed.server.url, verify=False) as http:
        assert http.get("/metrics").status_code == 404
        assert http.get("/metrics", headers=bearer("anything")).status_code == 404
    samples = scrape(observed.metrics_url)
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert value(samples, "authsvc_http_requests_total", **unmatched) >= 2
    # The raw path is never a label value.
    assert not [key for key in samples if ("route", "/metrics") in key[1]]


def test_a_request_id_goes_round_trip_and_onto_every_line_of_its_request(
    observed: Observed,
) -> None:
    server = observed.server
    given = f"trace-{uuid.uuid4().hex}:1.a_b"
    username = f"rid_{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=server.url, verify=False, http2=True) as http:
        body = {"username": username, "password": PASSWORD}
        user_id = http.post("/auth/register", json=body).json()["id"]
        wrong = {"username": username, "password": "not the password"}
        refused = http.post("/auth/login", json=wrong, headers={"X-Request-ID": given})
        assert refused.status_code == 401
        assert refused.headers["x-request-id"] == given
        assert (
            http.get("/healthz", headers={"X-Request-ID": given}).headers["x-request-id"] == given
        )
        # A success that named no id goes without one; an error always names its own.
        assert "x-request-id" not in http.get("/healthz").headers
        generated = http.get("/nowhere").headers["x-request-id"]
        assert GENERATED_ID.fullmatch(generated)
        for bad in ("has space", "x" * 129, "semi;colon", 'quo"te', "a,b"):
            assert "x-request-id" not in http.get("/healthz", headers={"X-Request-ID": bad}).headers
            answered = http.get("/nowhere", headers={"X-Request-ID": bad}).headers["x-request-id"]
            assert answered != bad and GENERATED_ID.fullmatch(answered), bad
    lines = [line for line in log_lines(server.log()) if line.get("request_id") == given]
    access = [line for line in lines if line["logger"] == "service.access"]
    assert len(access) == 2, lines
    assert {k: access[0][k] for k in ("method", "route", "status", "address")} == {
        "method": "POST",
        "route": "/auth/login",
        "status": 401,
        "address": "127.0.0.1",
    }
    assert access[0]["duration_ms"] > 0
    assert access[1]["route"] == "/healthz" and access[1]["status"] == 200
    failed = [line for line in lines if line.get("event") == "login_failed"]
    assert [line["user_id"] for line in failed] == [user_id], lines
    assert failed[0]["address"] == "127.0.0.1"
    (unmatched,) = [line for line in log_lines(server.log()) if line.get("request_id") == generated]
    assert (unmatched["route"], unmatched["status"]) == ("unmatched", 404)
    assert "semi;colon" not in server.log() and "has space" not in server.log()


def test_an_answer_without_the_app_is_counted_logged_and_named(observed: Observed) -> None:
    server, given = observed.server, f"big-{uuid.uuid4().hex}"
    before = scrape(observed.metrics_url)
    with httpx.Client(base_url=server.url, verify=False, http2=True) as http:
        too_big = http.post("/auth/login", content=b"x" * (2 * 1024 * 1024))
        named = http.post(
            "/auth/login", content=b"x" * (2 * 1024 * 1024), headers={"X-Request-ID": given}
        )
    assert (too_big.status_code, named.status_code) == (413, 413)
    assert GENERATED_ID.fullmatch(too_big.headers["x-request-id"])
    assert named.headers["x-request-id"] == given
    refused = {"route": "unmatched", "method": "POST", "status": "413"}
    counted = value(scrape(observed.metrics_url), "authsvc_http_requests_total", **refused)
    assert counted - value(before, "authsvc_http_requests_total", **refused) == 2
    (line,) = [line for line in log_lines(server.log()) if line.get("request_id") == given]
    assert line["logger"] == "service.access"
    assert (line["method"], line["route"], line["status"]) == ("POST", "unmatched", 413)
    assert line["address"] == "127.0.0.1" and line["duration_ms"] >= 0


def test_request_ids_are_checked() -> None:
    assert request_id("0af7651916cd43dd8448eb211c80319c") == "0af7651916cd43dd8448eb211c80319c"
    assert request_id("a" * 128) == "a" * 128
    for bad in (None, "", "a" * 129, "a b", "a\nb", "é", "x/../y"):
        assert GENERATED_ID.fullmatch(request_id(bad)), bad
    assert request_id(None) != request_id(None)


@dataclass
class Flow:
    """What the full flow used and whom it named, and the metrics before and after it."""

    used: list[str]
    ids: dict[str, str]
    before: Samples
    after: Samples
    command_output: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def delta(self, name: str, **labels: str) -> float:
        """How much a series grew during the flow."""
        return value(self.after, name, **labels) - value(self.before, name, **labels)


def tokens_of(response: httpx.Response, used: list[str]) -> dict[str, Any]:
    """A token response's body, its tokens added to what the flow used."""
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    used.extend(body[name] for name in ("access_token", "refresh_token") if name in body)
    return body


@pytest.fixture(scope="module")
async def flow(observed: Observed) -> AsyncIterator[Flow]:
    """Register, log in, refresh, replay, change the password, log out; the OAuth flows."""
    server = observed.server
    used = [PASSWORD, NEW_PASSWORD, server.env["JWT_SECRET"], server.env["SECRET_KEY"]]
    ids: dict[str, str] = {}
    counts = {"logins": 0, "pairs": 0, "failures": 0, "throttled": 0}
    before = scrape(observed.metrics_url)
    outputs: list[str] = []

    def run(*args: str) -> dict[str, Any]:
        done = command(server, *args)
        outputs.append(done.stderr)
        parsed: dict[str, Any] = json.loads(done.stdout) if done.stdout.startswith("{") else {}
        return parsed

    async with httpx.AsyncClient(base_url=server.url, verify=False, http2=True) as http:

        async def login(password: str) -> dict[str, Any]:
            body = {"username": username, "password": password}
            pair = tokens_of(await http.post("/auth/login", json=body), used)
            counts["logins"] += 1
            counts["pairs"] += 1
            return pair

        username = f"flow_{uuid.uuid4().hex[:10]}"
        body = {"username": username, "password": PASSWORD}
        ids["user"] = (await http.post("/auth/register", json=body)).json()["id"]
        first = await login(PASSWORD)
        # The same token again and again: checked through Redis, then from a kept verdict.
        for _ in range(60):
            path = f"/api/hello?access_token={first['access_token']}"
            hello = await http.get(path, headers=bearer(first["access_token"]))
            assert hello.status_code == 200
        refreshed = tokens_of(
            await http.post("/auth/refresh", headers=bearer(first["refresh_token"])), used
        )
        counts["pairs"] += 1
        replayed = await http.post("/auth/refresh", headers=bearer(first["refresh_token"]))
        assert replayed.status_code == 401
        assert (
            await http.get("/api/hello", headers=bearer(refreshed["access_token"]))
        ).status_code == 401
        current = await login(PASSWORD)
        change = {"current_password": "not the password", "new_password": NEW_PASSWORD}
        wrong = await http.post(
            "/auth/password", json=change, headers=bearer(current["access_token"])
        )
        assert wrong.status_code == 403
        counts["failures"] += 1
        change["current_password"] = PASSWORD
        changed = await http.post(
            "/auth/password", json=change, headers=bearer(current["access_token"])
        )
        assert changed.status_code == 204
        one, other = await login(NEW_PASSWORD), await login(NEW_PASSWORD)
        assert (
            await http.post("/auth/logout", headers=bearer(one["access_token"]))
        ).status_code == 204
        ended = await http.post("/auth/logout-all", headers=bearer(other["access_token"]))
        assert ended.status_code == 204

        guessed = f"flow_{uuid.uuid4().hex[:10]}"
        ids["guessed"] = (
            await http.post("/auth/register", json={"username": guessed, "password": PASSWORD})
        ).json()["id"]
        for _ in range(10):
            guess = {"username": guessed, "password": "a wrong guess!"}
            status = (await http.post("/auth/login", json=guess)).status_code
            if status == 429:
                counts["throttled"] += 1
                break
            assert status == 401
            counts["failures"] += 1
        assert counts["throttled"] == 1

        app = run(
            "clients", "create", "--name", "observed-app", "--redirect-uri", REDIRECT,
            "--grant-type", "authorization_code", "--grant-type", "refresh_token",
        )  # fmt: skip
        ids["app"] = app["client_id"]
        secret = run("clients", "rotate-secret", ids["app"])["client_secret"]
        machine = run(
            "clients", "create", "--name", "observed-machine", "--grant-type",
            "client_credentials", "--scope", "email",
        )  # fmt: skip
        ids["machine"] = machine["client_id"]
        used += [app["client_secret"], secret, machine["client_secret"]]
        rotated = command(server, "keys", "rotate")
        outputs.append(rotated.stderr)
        kid = re.search(r"new signing key (\S+),", rotated.stdout)
        assert kid, rotated.stdout
        ids["kid"] = kid.group(1)

        verifier, challenge = pkce()
        used.append(verifier)
        url = authorize_url(
            ids["app"],
            scope="profile email",
            code_challenge=challenge,
            code_challenge_method="S256",
        )
        async with httpx.AsyncClient(base_url=server.url, verify=False) as agent:
            redirected = await sign_in_and_consent(agent, url, username, NEW_PASSWORD)
            used.extend(value for value in agent.cookies.values() if len(value) >= 16)
        counts["logins"] += 1
        code = query_of(redirected)["code"]
        used.append(code)
        app_auth = (ids["app"], secret)
        exchange = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        }
        granted = tokens_of(await http.post("/oauth/token", data=exchange, auth=app_auth), used)
        renew = {"grant_type": "refresh_token", "refresh_token": granted["refresh_token"]}
        tokens_of(await http.post("/oauth/token", data=renew, auth=app_auth), used)
        again = await http.post("/oauth/token", data=renew, auth=app_auth)
        assert again.status_code == 400
        redeemed_twice = await http.post("/oauth/token", data=exchange, auth=app_auth)
        assert redeemed_twice.status_code == 400

        machine_auth = (ids["machine"], machine["client_secret"])
        own = {"grant_type": "client_credentials"}
        issued = tokens_of(await http.post("/oauth/token", data=own, auth=machine_auth), used)
        assert (
            await http.get("/api/email", headers=bearer(issued["access_token"]))
        ).status_code == 200
        gone = {"token": issued["access_token"], "token_type_hint": "access_token"}
        assert (await http.post("/oauth/revoke", data=gone, auth=machine_auth)).status_code == 200
        assert (
            await http.get("/api/email", headers=bearer(issued["access_token"]))
        ).status_code == 401
        run("clients", "delete", ids["app"])

    yield Flow(used, ids, before, scrape(observed.metrics_url), "".join(outputs), counts)


def test_no_token_password_secret_or_code_reaches_any_log(observed: Observed, flow: Flow) -> None:
    logs = observed.server.log() + flow.command_output
    assert len(log_lines(observed.server.log())) > 100  # DEBUG, access log: plenty was said
    assert len(flow.used) > 20
    for used in flow.used:
        assert used not in logs
        for part in used.split("."):  # a JWT's payload or signature on its own
            assert len(part) < 16 or part not in logs


def test_audit_events_name_who(observed: Observed, flow: Flow) -> None:
    log = observed.server.log()
    user, guessed = flow.ids["user"], flow.ids["guessed"]

    def of(event: str, text: str = log) -> list[dict[str, Any]]:
        lines = audit_lines(text, event)
        assert lines, f"no {event} line"
        return lines

    logins = [line for line in of("login") if line["user_id"] == user]
    assert len(logins) == 5 and all(line["request_id"] for line in logins)
    assert len([line for line in logins if "sid" in line]) == 4
    assert [line["via"] for line in logins if "sid" not in line] == ["authorize_page"]
    assert len([line for line in of("login_failed") if line["user_id"] == guessed]) >= 2
    assert [line.get("via") for line in of("login_failed") if line["user_id"] == user] == [
        "password_change"
    ]
    throttled = of("login_throttled")
    assert throttled[-1]["level"] == "WARNING" and throttled[-1]["address"] == "127.0.0.1"
    assert [line["user_id"] for line in of("password_changed")] == [user]
    for event in ("logout", "logout_all", "refresh_replay"):
        (line,) = [line for line in of(event) if line["user_id"] == user]
        assert line["sid"], line
    assert [line["client_id"] for line in of("oauth_refresh_replay")] == [flow.ids["app"]]
    (code_replay,) = of("code_replay")
    assert code_replay["client_id"] == flow.ids["app"] and code_replay["grant_id"]
    assert [line["client_id"] for line in of("oauth_token_revoked")] == [flow.ids["machine"]]
    commands = flow.command_output
    created = {line["client_id"] for line in of("client_created", commands)}
    assert created == {flow.ids["app"], flow.ids["machine"]}
    assert [line["client_id"] for line in of("client_secret_rotated", commands)] == [
        flow.ids["app"]
    ]
    assert [line["client_id"] for line in of("client_deleted", commands)] == [flow.ids["app"]]
    assert [line["kid"] for line in of("key_rotated", commands)] == [flow.ids["kid"]]


def test_the_flow_is_counted_across_workers(flow: Flow) -> None:
    counts = flow.counts
    assert flow.delta("authsvc_logins_total") == counts["logins"]
    failures = "authsvc_login_failures_total"
    assert flow.delta(failures, reason="credentials") == counts["failures"]
    assert flow.delta(failures, reason="throttled") == counts["throttled"]
    issued = "authsvc_tokens_issued_total"
    assert flow.delta(issued, kind="access") == counts["pairs"]
    assert flow.delta(issued, kind="refresh") == counts["pairs"]
    assert flow.delta(issued, kind="oauth_access") == 2
    assert flow.delta(issued, kind="oauth_refresh") == 2
    assert flow.delta(issued, kind="client_credentials") == 1
    for token in ("refresh", "oauth_refresh", "code"):
        assert flow.delta("authsvc_replays_detected_total", token=token) == 1, token
    revocations = {
        "logout": 1,
        "logout-all": 1,
        "password-change": 1,
        "refresh-reuse": 2,
        "code-replay": 1,
        "revoked": 1,
    }
    for reason, count in revocations.items():
        assert flow.delta("authsvc_revocations_total", reason=reason) == count, reason
    for event, count in {
        "registered": 2,
        "logout": 1,
        "logout_all": 1,
        "password_changed": 1,
    }.items():
        assert flow.delta("authsvc_audit_events_total", event=event) == count, event
    assert flow.delta("authsvc_kept_verdicts_total", result="hit") >= 1
    assert flow.delta("authsvc_kept_verdicts_total", result="miss") >= 1
    checks = "authsvc_blocklist_check_duration_seconds_count"
    assert flow.delta(checks, way="redis") >= 1
    assert value(flow.after, "authsvc_blocklist_rebuilds_total", outcome="loaded") >= 1
    hello = {"route": "/api/hello", "method": "GET"}
    assert flow.delta("authsvc_http_requests_total", **hello, status="200") >= 60
    assert (
        flow.delta("authsvc_http_requests_total", route="/oauth/token", method="POST", status="400")
        == 2
    )


def test_every_log_line_is_one_json_object(observed: Observed) -> None:
    lines = log_lines(observed.server.log())
    assert any("Running on https://" in line["message"] for line in lines)
    for line in lines:
        assert {"time", "level", "logger", "pid", "message"} <= line.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line


def test_a_batch_of_observations_reads_as_one_by_one() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("t_seconds", "t", ["way"], buckets=REQUEST_BUCKETS, registry=registry)
    counter = Counter("t_events", "t", ["way"], registry=registry)
    tally = Tally(period=3600)
    bounds = (*REQUEST_BUCKETS, float("inf"))
    for seconds in (0.0001, 0.0005, 0.0005001, 0.003, 0.7, 3, 42, 10, 0):
        histogram.labels("direct").observe(seconds)
        counter.labels("direct").inc()
        tally.observe(histogram.labels("tallied"), bounds, seconds)
        tally.count(counter.labels("tallied"))
    assert registry.get_sample_value("t_events_total", {"way": "tallied"}) == 0
    tally.flush()
    by_way: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                key = (sample.name, sample.labels.get("le", ""))
                by_way[key][sample.labels["way"]] = sample.value
    assert len(by_way) == len(REQUEST_BUCKETS) + 4  # the buckets, +Inf, count, sum, events
    for key, values in by_way.items():
        assert values["direct"] == pytest.approx(values["tallied"]), key


def test_lines_carry_fields_and_the_request_id_in_both_formats() -> None:
    record = logging.LogRecord(
        "service.audit", logging.INFO, __file__, 1, "audit %s", ("login",), None
    )
    record.fields = {"event": "login", "user_id": "u1", "message": "not this"}
    record.request_id = "rid-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "audit login"
    assert (line["event"], line["user_id"], line["request_id"]) == ("login", "u1", "rid-1")
    text = TextFormatter().format(record)
    assert text.endswith(
        'INFO service.audit: audit login event="login" user_id="u1" request_id="rid-1"'
    )


@pytest.mark.parametrize("method", ["GET", 'GE"T\\\n\u00e9'])
def test_the_composed_access_line_is_the_formatted_one(method: str) -> None:
    formatter = JsonFormatter()
    composed = formatter.access_line(method, "/api/hello", 200, 0.0012345, "rid-1", "::1")
    fields = {
        "method": method,
        "route": "/api/hello",
        "status": 200,
        "duration_ms": 1.234,
        "address": "::1",
    }
    args = (method, "/api/hello", 200)
    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "%s %s %d", args, None)
    record.fields = fields
    record.request_id = "rid-1"
    formatted = formatter.format(record)
    assert "\n" not in composed
    parsed, expected = json.loads(composed), json.loads(formatted)
    assert list(parsed) == list(expected)
    assert parsed.pop("time")[:16] == expected.pop("time")[:16]
    assert parsed == expected


async def test_public_metrics_need_the_metrics_token(settings: Settings, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(48)
    public = settings_beside(settings, tmp_path, metrics_public=True, metrics_token=token)
    async with serve_in_process(public) as http:
        assert (await http.get("/healthz")).status_code == 200
        for header in ({}, bearer("x" * 64), bearer(token[:-1]), {"Authorization": token}):
            refused = await http.get("/metrics", headers=header)
            assert refused.status_code == 401, header
            assert refused.headers["www-authenticate"].startswith("Bearer")
        answered = await http.get("/metrics", headers={"Authorization": f"bearer {token}"})
    assert answered.status_code == 200
    assert answered.headers["content-type"].startswith("text/plain")
    healthz = re.search(
        r'^authsvc_http_requests_total\{method="GET",route="/healthz",status="200"\} (\S+)$',
        answered.text,
        re.MULTILINE,
    )
    assert healthz and float(healthz.group(1)) >= 1, answered.text
    assert token not in answered.text


def test_a_metrics_address_in_use_stops_the_service_in_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"127.0.0.1:{taken.getsockname()[1]}"
        env = {**server_env(settings, tmp_path), "METRICS_BIND": bind}
        server = launch_server(env, bind=f"127.0.0.1:{free_port()}", workers=1, log_dir=tmp_path)
        status = server.process.wait(60)
    assert status == 1, server.log()
    (line,) = log_lines(server.log())
    assert line["message"].startswith(f"cannot listen on METRICS_BIND {bind}: "), line


def metrics_directory(pid: int) -> Path:
    """The metrics directory a worker writes to, from its environment."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (found,) = [item for item in environ if item.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(found.split(b"=", 1)[1].decode())


@pytest.mark.fault
def test_a_dead_workers_counts_stay_and_the_run_leaves_no_files(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    env = {**server_env(settings, tmp_path), "METRICS_BIND": f"127.0.0.1:{port}"}
    server = start_server(env, workers=WORKERS, log_dir=tmp_path)
    try:
        wait_until_listening(server, WORKERS)
        served = healthz_on_new_connections(server, at_least=10)
        victim = min(served)
        directory = metrics_directory(victim)
        assert list(directory.glob(f"*_{victim}.db"))
        assert value(scrape(url), "authsvc_http_requests_total", **HEALTHZ) == sum(served.values())
        os.kill(victim, signal.SIGKILL)
        wait_until_gone(victim)
        wait_until_listening(server, WORKERS + 1)
        deadline = time.monotonic() + 10
        while value(scrape(url, settle=False), "authsvc_workers") != WORKERS:
            assert time.monotonic() < deadline, scrape(url, settle=False)
            time.sleep(0.1)
        assert not (directory / f"gauge_livesum_{victim}.db").exists()
        more = healthz_on_new_connections(server, at_least=10)
        total = sum(served.values()) + sum(more.values())
        assert value(scrape(url), "authsvc_http_requests_total", **HEALTHZ) == total
    finally:
        assert server.stop() == 0, server.log()
    assert not directory.exists()
    assert "Traceback" not in server.log(), server.log()
