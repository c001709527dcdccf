"""Sequential latency of the client_credentials token request, for one or more source trees.

    .venv/bin/python bench/token_latency.py [--requests 300] [--post] TREE [TREE ...]

A TREE is a directory holding the service's sources (this repository, or another revision
exported with `git archive REV | tar -x -C DIR`). Each runs `python -m service serve
--workers 1` over TLS on its own port, against one throwaway database and client; the
requests alternate between the servers, one at a time over a keep-alive HTTP/1.1
connection each, so that whatever else the machine does weighs on every tree alike.
Reports latency and the worker's CPU time per request (what bounds throughput under load).
Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import secrets
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import backends
import stacks

WARM_UP = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--post", action="store_true", help="client_secret_post, not Basic")
    parser.add_argument("trees", nargs="+", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="token-latency-"))
    run = backends.create(workdir)
    env = stacks.base_env() | {
        "SERVICE_ENV": "production",
        "DATABASE_URL": run.database_url,
        "REDIS_URL": backends.REDIS_URL,
        "REDIS_PREFIX": run.redis_prefix("svc"),
        "JWT_SECRET": secrets.token_urlsafe(48),
        "SECRET_KEY": secrets.token_urlsafe(48),
        "JWT_ISSUER": "https://127.0.0.1",
        "TLS_CERT_FILE": str(run.cert),
        "TLS_KEY_FILE": str(run.key),
        "INSTANCE_DIR": str(workdir),
    }
    servers: list[subprocess.Popen[bytes]] = []
    try:
        client_id, secret = _client(args.trees[0], env, args.post)
        ports = []
        for tree in args.trees:
            port = stacks.free_port()
            log = (workdir / f"server-{port}.log").open("wb")
            command = [sys.executable, "-m", "service", "serve", "--bind", f"127.0.0.1:{port}"]
            servers.append(
                subprocess.Popen(
                    [*command, "--workers", "1"],
                    env=env
                    | {
                        "PYTHONPATH": str(tree.resolve()),
                        "JWT_ISSUER": f"https://127.0.0.1:{port}",
                    },
                    cwd=tree,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            ports.append(port)
        connections = [_connect(port) for port in ports]
        body, headers = _request(client_id, secret, args.post)
        for _ in range(WARM_UP):
            for connection in connections:
                _token(connection, body, headers)
        workers = [_worker(server.pid) for server in servers]
        cpu_before = [_cpu(pid) for pid in workers]
        times: list[list[float]] = [[] for _ in connections]
        for _ in range(args.requests):
            for i, connection in enumerate(connections):
                times[i].append(_token(connection, body, headers))
        spent = [_cpu(pid) - before for pid, before in zip(workers, cpu_before, strict=True)]
        for tree, ms, seconds in zip(args.trees, times, spent, strict=True):
            ms.sort()
            print(
                f"{tree}: {'post' if args.post else 'basic'} n={args.requests} "
                f"mean={statistics.mean(ms):.2f}ms p50={ms[len(ms) // 2]:.2f}ms "
                f"p90={ms[int(len(ms) * 0.9)]:.2f}ms p99={ms[int(len(ms) * 0.99)]:.2f}ms "
                f"worker_cpu={seconds * 1000 / args.requests:.2f}ms/req"
            )
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            server.wait(30)
        backends.drop(run)


def _client(tree: Path, env: dict[str, str], post: bool) -> tuple[str, str]:
    """Migrate the database and register a client_credentials client; (id, secret)."""
    python = [sys.executable, "-m", "service"]
    options: dict[str, Any] = {"env": env | {"PYTHONPATH": str(tree.resolve())}, "cwd": tree}
    options["check"] = True
    subprocess.run([*python, "migrate"], capture_output=True, **options)
    method = "client_secret_post" if post else "client_secret_basic"
    register = ["clients", "create", "--name", "latency", "--grant-type", "client_credentials"]
    created = subprocess.run(
        [*python, *register, "--auth-method", method],
        capture_output=True,
        text=True,
        **options,
    ).stdout
    client = json.loads(created[created.index("{") :])
    return client["client_id"], client["client_secret"]


def _connect(port: int, timeout: float = 60.0) -> http.client.HTTPSConnection:
    """A keep-alive connection to a server that answers /readyz."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context)
            connection.request("GET", "/readyz")
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return connection
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} is not ready")
        time.sleep(0.2)


def _request(client_id: str, secret: str, post: bool) -> tuple[str, dict[str, str]]:
    form = {"grant_type": "client_credentials", "scope": "profile"}
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if post:
        form |= {"client_id": client_id, "client_secret": secret}
    else:
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        headers["authorization"] = f"Basic {basic}"
    return urlencode(form), headers


def _token(connection: http.client.HTTPSConnection, body: str, headers: dict[str, str]) -> float:
    """One token request; its latency in ms."""
    started = time.perf_counter()
    connection.request("POST", "/oauth/token", body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    elapsed = (time.perf_counter() - started) * 1000
    if response.status != 200:
        raise RuntimeError(f"token request answered {response.status}: {data[:300]!r}")
    return elapsed


def _worker(pid: int) -> int:
    """Hypercorn's worker process under the server process (not the resource tracker)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for child in children.stdout.split():
        if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    return pid


def _cpu(pid: int) -> float:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
