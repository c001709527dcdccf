"""The servers under test: how each is started, probed, and stopped (its whole process group)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from backends import REDIS_URL, Backends
from client import PASSWORD, USERNAME, OAuthClient

BENCH_DIR = Path(__file__).resolve().parent
WORKERS = "2"
KEEP_ALIVE = "75"
BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


@dataclass
class Stack:
    """One server: a command run in its own session so that stop() reaches every worker."""

    name: str
    label: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    port: int
    ready_path: str = "/healthz"
    h2: bool = True
    check: bool = True
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Base URL, always on the loopback interface."""
        return f"https://127.0.0.1:{self.port}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env() -> dict[str, str]:
    """A minimal environment, so that no stray setting of the caller leaks in."""
    return {key: os.environ[key] for key in BASE_ENV_KEYS if key in os.environ}


def ours(backends: Backends, service_src: Path, extra: dict[str, str] | None = None) -> Stack:
    """The service in production mode: Hypercorn, 2 workers, TLS."""
    port = free_port()
    env = (
        base_env()
        | {
            "DATABASE_URL": backends.database_url,
            "REDIS_URL": REDIS_URL,
            "REDIS_PREFIX": backends.redis_prefix("svc"),
            "JWT_SECRET": secrets.token_urlsafe(48),
            "SECRET_KEY": secrets.token_urlsafe(48),
            "JWT_ISSUER": f"https://127.0.0.1:{port}",
            "TLS_CERT_FILE": str(backends.cert),
            "TLS_KEY_FILE": str(backends.key),
            "EXPOSE_WORKER_ID": "true",
            # The references write no access log; ours and its no-check twin (development
            # mode, where the default is off) write none either, so every stack is compared
            # doing the same work. The access log's own cost: docs/performance.md.
            "ACCESS_LOG": "false",
        }
        | (extra or {})
    )
    command = [sys.executable, "-m", "service", "serve", "--bind", f"127.0.0.1:{port}"]
    command += ["--workers", WORKERS]
    return Stack("ours", "ours (Hypercorn)", command, env, service_src, port, "/readyz")


def migrate(stack: Stack) -> None:
    """Apply the service's migrations to the run's database (with stack's settings)."""
    command = [sys.executable, "-m", "service", "migrate"]
    done = subprocess.run(
        command, cwd=stack.cwd, env=stack.env, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed ({done.returncode}):\n{done.stderr[-3000:]}")


def ref_flask(backends: Backends, *, check: bool = True) -> Stack:
    """Reference (a): Flask-JWT-Extended + redis-py under gunicorn gthread."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--chdir", str(BENCH_DIR), "-k", "gthread"]
    command += ["-w", WORKERS, "--threads", "8", "--keep-alive", KEEP_ALIVE]
    command += ["--http-protocols", "h2,h1", "--log-level", "warning"]
    command += ["--certfile", str(backends.cert), "--keyfile", str(backends.key)]
    command += ["-b", f"127.0.0.1:{port}", "ref_flask:app"]
    name = "flask" if check else "flask-nocheck"
    label = "ref a (gunicorn gthread)" + ("" if check else ", no check")
    env = _ref_env(backends, name) | ({} if check else {"BENCH_NO_CHECK": "1"})
    # The twin only prices ref a's own check over HTTP/1.1: gunicorn's HTTP/2 stalls anyway.
    return Stack(name, label, command, env, BENCH_DIR, port, h2=check, check=check)


def ref_fastapi(backends: Backends) -> Stack:
    """Reference (b): FastAPI + PyJWT + redis.asyncio under uvicorn (no HTTP/2)."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(BENCH_DIR)]
    command += ["--workers", WORKERS, "--loop", "uvloop", "--http", "httptools"]
    command += ["--ssl-certfile", str(backends.cert), "--ssl-keyfile", str(backends.key)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", KEEP_ALIVE]
    command += ["--no-access-log", "--log-level", "warning", "ref_fastapi:app"]
    env = _ref_env(backends, "fastapi")
    return Stack("fastapi", "ref b (uvicorn)", command, env, BENCH_DIR, port, h2=False)


def _ref_env(backends: Backends, name: str) -> dict[str, str]:
    """Environment of a reference app: its Redis prefix, user and OAuth client.

    The client's id and secret have the shape of ours' (token_urlsafe 16 and 32 bytes).
    """
    return base_env() | {
        "REDIS_URL": REDIS_URL,
        "BENCH_PREFIX": backends.redis_prefix(name),
        "JWT_SECRET": secrets.token_urlsafe(48),
        "BENCH_USER": USERNAME,
        "BENCH_PASSWORD": PASSWORD,
        "BENCH_CLIENT_ID": secrets.token_urlsafe(16),
        "BENCH_CLIENT_SECRET": secrets.token_urlsafe(32),
    }


def start(stack: Stack, logdir: Path) -> None:
    """Start the server in a new session (its own process group)."""
    stack.log_path = logdir / f"{stack.name}.log"
    with stack.log_path.open("wb") as log:
        stack.process = subprocess.Popen(
            stack.command,
            cwd=stack.cwd,
            env=stack.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(stack: Stack, context: ssl.SSLContext, timeout: float = 90.0) -> None:
    """Poll the readiness path until it answers 200; fail early if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.process is None or stack.process.poll() is not None:
            raise RuntimeError(f"{stack.name} exited during start-up:\n{log_tail(stack)}")
        if _probe(stack, context) == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{stack.name} not ready after {timeout:.0f} s:\n{log_tail(stack)}")


def _probe(stack: Stack, context: ssl.SSLContext) -> int:
    """Status of the readiness path, 0 if it cannot be reached."""
    conn = http.client.HTTPSConnection("127.0.0.1", stack.port, context=context, timeout=2)
    try:
        conn.request("GET", stack.ready_path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def stop(stack: Stack, grace: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after grace."""
    process = stack.process
    if process is None:
        return
    pgid = process.pid  # start_new_session: the leader's pid is the group id
    _signal_group(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)
    _signal_group(pgid, signal.SIGKILL)
    process.wait(5)
    stack.process = None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group that may be gone already."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def worker_pids(stack: Stack) -> list[int]:
    """Pids of the server's worker processes (children of the master, not helpers)."""
    if stack.process is None:
        return []
    pids = []
    for pid in _children(stack.process.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def _children(pid: int) -> list[int]:
    """Direct children of pid, from every one of its threads."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(child) for child in text.split()]
    return found


def log_tail(stack: Stack, lines: int = 30) -> str:
    """The last lines of the server's log."""
    if stack.log_path is None or not stack.log_path.exists():
        return ""
    return "\n".join(stack.log_path.read_text(errors="replace").splitlines()[-lines:])


def create_oauth_client(stack: Stack) -> OAuthClient:
    """Register a confidential client_credentials client through the service's CLI."""
    command = [sys.executable, "-m", "service", "clients", "create", "--name", "bench"]
    command += ["--grant-type", "client_credentials", "--scope", "profile email"]
    done = subprocess.run(
        command, cwd=stack.cwd, env=stack.env, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"clients create failed ({done.returncode}):\n{done.stderr[-3000:]}")
    created = json.loads(done.stdout)
    return OAuthClient(created["client_id"], created["client_secret"])
