"""Load generators: wrk (HTTP/1.1 keep-alive over TLS) and h2load (HTTP/2 over TLS)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LUA_DIR = Path(__file__).resolve().parent / "lua"
WRK_THREADS = 2
CONNECTIONS = 16
H2_CLIENTS = 16  # as many connections as wrk: workers share connections, not streams
H2_STREAMS = 4
SLACK = 30
H2_STALL_S = 10  # h2load past its duration by this much has stalled (gunicorn's h2 does)
TOOLS = {"wrk": "wrk", "h2load": "nghttp2-client", "timeout": "coreutils"}


@dataclass(frozen=True)
class Result:
    """One measured run."""

    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    errors: int

    @property
    def rps(self) -> float:
        """Responses per second (any status)."""
        return self.requests / self.duration_s if self.duration_s else 0.0


def missing_tools() -> list[str]:
    """Debian packages to install for the load generators that are not on PATH."""
    return sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})


def wrk(url: str, script: str, args: list[str], duration: float, **options: int) -> Result:
    """Run wrk for duration seconds with a Lua script from bench/lua."""
    command = _wrk_command(url, script, args, duration, **options)
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + SLACK, env=_lua_env()
    )
    return _parse_wrk(completed.stdout, completed.stderr)


def wrk_start(
    url: str, script: str, args: list[str], duration: float, **options: int
) -> subprocess.Popen[str]:
    """Start wrk in the background (for a concurrent storm); finish with wrk_finish."""
    command = _wrk_command(url, script, args, duration, **options)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_lua_env()
    )


def wrk_finish(process: subprocess.Popen[str], timeout: float) -> Result:
    """Wait for a background wrk and parse its result."""
    stdout, stderr = process.communicate(timeout=timeout)
    return _parse_wrk(stdout, stderr)


def wrk_tokens(url: str, tokens: list[str], limit: float, connections: int = CONNECTIONS) -> Result:
    """POST once per token (Bearer), spread over wrk's threads; ends when all are answered."""
    threads = max(1, min(WRK_THREADS, len(tokens)))
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        token_file = Path(tmp) / "tokens.txt"
        token_file.write_text("\n".join(tokens) + "\n")
        done = f"{tmp}/done-"
        args = [str(token_file), str(threads), done]
        command = _wrk_command(
            url, "tokens.lua", args, limit, threads=threads, connections=connections
        )
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_lua_env()
        )
        _wait_for_files([f"{done}{i}" for i in range(threads)], process, limit)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=SLACK)
    return _parse_wrk(stdout, stderr)


def wrk_chain(url: str, seeds: list[str], duration: float) -> Result:
    """POST refresh chains for duration seconds: each answer's refresh token is sent next."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        token_file = Path(tmp) / "seeds.txt"
        token_file.write_text("\n".join(seeds) + "\n")
        return wrk(url, "chain.lua", [str(token_file), str(WRK_THREADS)], duration)


def _wait_for_files(paths: list[str], process: subprocess.Popen[str], limit: float) -> None:
    """Wait until every path exists, wrk exits, or limit passes."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        if all(os.path.exists(path) for path in paths):
            return
        time.sleep(0.005)


def _wrk_command(
    url: str,
    script: str,
    args: list[str],
    duration: float,
    *,
    threads: int = WRK_THREADS,
    connections: int = CONNECTIONS,
) -> list[str]:
    """The wrk command line for one run."""
    connections = max(connections, threads)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s"]
    command += ["--timeout", "10s", "-s", str(LUA_DIR / script), url, "--", *args]
    return command


def _lua_env() -> dict[str, str]:
    """Environment for wrk: where the Lua scripts live."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BENCH_LUA_DIR": str(LUA_DIR)}


def _parse_wrk(stdout: str, stderr: str) -> Result:
    """Read the BENCH_RESULT line that summary.lua prints."""
    match = re.search(r"^BENCH_RESULT (\{.*\})$", stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk gave no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    data = json.loads(match.group(1))
    filler = data["filler"]  # stand-ins for skipped or lost tokens (tokens.lua, chain.lua): 401
    return Result(
        requests=data["requests"] - filler,
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        non2xx=data["non2xx"] - filler,
        errors=data["socket_errors"],
    )


def h2load(
    url: str,
    duration: float,
    headers: list[str],
    body: str | None = None,
    warm_up: float = 0.0,
    clients: int = H2_CLIENTS,
    streams: int = H2_STREAMS,
) -> Result:
    """Run h2load (HTTP/2 over TLS) for duration seconds; latency from its per-request log."""
    with tempfile.TemporaryDirectory(prefix="bench-h2-") as tmp:
        log = Path(tmp) / "requests.log"
        command = ["timeout", str(int(duration + H2_STALL_S)), "h2load", "-t1"]
        command += [f"-c{clients}", f"-m{streams}", f"-D{max(1, round(duration))}"]
        command += [f"--log-file={log}"]
        if warm_up:
            command += [f"--warm-up-time={warm_up}"]
        for header in headers:
            command += ["-H", header]
        if body is not None:
            data = Path(tmp) / "body.json"
            data.write_text(body)
            command += ["-d", str(data)]
        command.append(url)
        completed = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
        return _parse_h2load(completed.stdout + completed.stderr, log)


def get_h1(base_url: str, token: str, seconds: float) -> Result:
    """Protected GET (/api/hello with a Bearer token) over HTTP/1.1 (wrk)."""
    return wrk(f"{base_url}/api/hello", "get.lua", [token], seconds)


def get_h2(base_url: str, token: str, seconds: float, streams: int = H2_STREAMS) -> Result:
    """Protected GET (/api/hello with a Bearer token) over HTTP/2 (h2load)."""
    header = f"authorization: Bearer {token}"
    return h2load(f"{base_url}/api/hello", seconds, [header], streams=streams)


def _parse_h2load(output: str, log: Path) -> Result:
    """Read h2load's summary and its per-request log."""
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", output)
    requests = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", output)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    if not (finished and requests and codes):
        raise RuntimeError(f"h2load gave no result:\n{output[-2000:]}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    done = int(requests.group(1))
    latencies = sorted(_h2load_latencies(log))
    p50, p99 = percentiles(latencies)
    non2xx = int(codes.group(3)) + int(codes.group(4))
    return Result(done, seconds, p50, p99, non2xx, done - int(requests.group(2)) - non2xx)


def _h2load_latencies(log: Path) -> list[float]:
    """Milliseconds per request from h2load's log (start us, status, duration us)."""
    if not log.exists():
        return []
    values = []
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].isdigit():
            values.append(int(parts[2]) / 1e3)
    return values


def percentiles(sorted_ms: list[float]) -> tuple[float, float]:
    """p50 and p99 of sorted milliseconds."""
    if len(sorted_ms) < 2:
        value = sorted_ms[0] if sorted_ms else 0.0
        return value, value
    cuts = statistics.quantiles(sorted_ms, n=100, method="inclusive")
    return cuts[49], cuts[98]
