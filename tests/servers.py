"""Start the real server (`python -m service serve`) as a subprocess, over TLS, for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from redis.crc import key_slot

from service.config import Settings, parse_library_changes
from service.tls import ensure_dev_certificate

ROOT = Path(__file__).resolve().parent.parent


def enabled_changes() -> frozenset[str]:
    """The library changes this run applies: LIBRARY_CHANGES (all unless set), as servers do.

    Servers started here inherit the variable; `LIBRARY_CHANGES=none pytest ...` runs the
    tests against the libraries' own code.
    """
    return parse_library_changes(os.environ.get("LIBRARY_CHANGES", "all"))


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, never the same one twice.

    A group of servers takes several before any of them binds: the kernel may offer one
    again meanwhile (a cluster node's bus port equal to another node's port).
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class RunningServer:
    """A server process and how to reach it."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the whole process group and wait; SIGKILL if it does not go."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
                raise
        return self.process.returncode


def start_server(
    env: dict[str, str],
    *,
    workers: int = 1,
    log_dir: Path,
    dev: bool = False,
    cwd: Path | None = None,
    ready_path: str = "/readyz",
    timeout: float = 60.0,
    unset: tuple[str, ...] = (),
    bind: str | None = None,
    proxy_only: bool = False,
) -> RunningServer:
    """Start the service (on a free port unless bind says where) and wait until it is ready.

    With proxy_only, it serves env's PROXY_BIND alone, in plain HTTP (`serve --proxy-only`).
    """
    server = launch_server(
        env,
        bind=None if proxy_only else bind or f"127.0.0.1:{free_port()}",
        workers=workers,
        log_dir=log_dir,
        dev=dev,
        cwd=cwd,
        unset=unset,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + ready_path, verify=False, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")


def launch_server(
    env: dict[str, str],
    *,
    bind: str | None,
    workers: int,
    log_dir: Path,
    dev: bool = False,
    cwd: Path | None = None,
    unset: tuple[str, ...] = (),
) -> RunningServer:
    """Start `python -m service serve` on bind (host:port, [v6]:port) without waiting for it.

    Without bind, it serves env's PROXY_BIND alone (`--proxy-only`): its url is http://.
    """
    url = f"https://{bind}" if bind else f"http://{env['PROXY_BIND']}"
    log_path = log_dir / f"server-{url.rsplit(':', 1)[1]}-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "service", "serve", "--workers", str(workers)]
    command += ["--bind", bind] if bind else ["--proxy-only"]
    if dev:
        command.append("--dev")
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    for name in [name for name in full_env if name.startswith(unset)]:
        del full_env[name]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd or ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return RunningServer(process=process, url=url, log_path=log_path, env=full_env)


def wait_until_listening(server: RunningServer, workers: int, timeout: float = 30.0) -> None:
    """Wait until that many sockets listen: start_server returns once the first one does."""
    deadline = time.monotonic() + timeout
    while server.log().count(f"Running on {server.url.split('//')[0]}//") < workers:
        assert server.process.poll() is None, server.log()
        assert time.monotonic() < deadline, f"not {workers} workers listening:\n{server.log()}"
        time.sleep(0.05)


def is_running(pid: int) -> bool:
    """Whether a process with this pid exists and has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until process pid has exited."""
    deadline = time.monotonic() + timeout
    while is_running(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.02)


def server_env(settings: Settings, tmp: Path) -> dict[str, str]:
    """Environment that makes `python -m service serve` use the test backends."""
    cert, key = ensure_dev_certificate(tmp)
    return {
        "SERVICE_ENV": "production",
        "DATABASE_URL": str(settings.database_url),
        "REDIS_URL": str(settings.redis_url),
        "REDIS_PREFIX": settings.redis_prefix,
        "JWT_SECRET": str(settings.jwt_secret),
        "SECRET_KEY": str(settings.secret_key),
        "JWT_ISSUER": settings.jwt_issuer,
        "TLS_CERT_FILE": str(cert),
        "TLS_KEY_FILE": str(key),
        "INSTANCE_DIR": str(tmp),
        "EXPOSE_WORKER_ID": "true",
        "PASSWORD_MEMORY_KIB": str(settings.password_memory_kib),
        "PASSWORD_TIME_COST": str(settings.password_time_cost),
    }


class SnapshottingRedis:
    """redis-server with RDB snapshots on, on a free port, restartable from its snapshot."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (again) on the same port and data directory."""
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "3600 1",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def crash(self) -> None:
        """SIGKILL: whatever was written after the last snapshot is lost."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Stop for good."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


MASTER_NAME = "authsvc"


def start_redis_process(*arguments: str) -> subprocess.Popen[bytes]:
    """redis-server with these arguments, its output discarded."""
    return subprocess.Popen(["redis-server", *arguments], stdout=subprocess.DEVNULL)


def wait_for_redis(port: int, timeout: float = 10.0) -> None:
    """Wait until a Redis (or a sentinel) answers PING on 127.0.0.1:port."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, f"nothing answers on port {port}"
                time.sleep(0.05)
    finally:
        client.close()


class RedisProcesses:
    """Redis processes a test started, by port: kill one, or stop them all."""

    def __init__(self) -> None:
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def kill(self, port: int) -> None:
        """SIGKILL the server on that port: what it had not replicated is lost."""
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """Stop every process for good."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        self.processes.clear()


class SentinelGroup(RedisProcesses):
    """One primary, one replica and three sentinels on free loopback ports, without persistence.

    The sentinels call the primary down after down_after_ms without an answer, and fail
    over to the replica (a quorum of two).
    """

    def __init__(self, directory: Path, *, down_after_ms: int = 1000) -> None:
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        super().__init__()

    @property
    def url(self) -> str:
        """REDIS_URL for the service: the sentinels and the master name."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> None:
        """Start the primary, its replica (synced), then the sentinels (agreed on the replica)."""
        # --dir: a replica's full sync writes the primary's snapshot there (dump.rdb).
        common = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
        common += ("--dir", str(self.directory))
        self.processes[self.primary_port] = start_redis_process(
            "--port", str(self.primary_port), *common
        )
        wait_for_redis(self.primary_port)
        self.processes[self.replica_port] = start_redis_process(
            "--port", str(self.replica_port), "--replicaof", "127.0.0.1", str(self.primary_port),
            *common,
        )  # fmt: skip
        self._wait_for_sync()
        for port in self.sentinel_ports:
            config = self.directory / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self.processes[port] = start_redis_process(str(config), "--sentinel")
        for port in self.sentinel_ports:
            wait_for_redis(port)
        self._wait_for_sentinels()

    def _wait_for_sync(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.replica_port)
        deadline = time.monotonic() + 10
        try:
            while client.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica never synced"
                time.sleep(0.05)
        finally:
            client.close()

    def _wait_for_sentinels(self) -> None:
        """Wait until every sentinel knows the replica and the other sentinels."""
        deadline = time.monotonic() + 20
        for port in self.sentinel_ports:
            client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
            try:
                while True:
                    state = client.sentinel_master(MASTER_NAME)
                    if state["num-slaves"] >= 1 and state["num-other-sentinels"] >= 2:
                        break
                    assert time.monotonic() < deadline, "the sentinels never met"
                    time.sleep(0.1)
            finally:
                client.close()

    def primary(self) -> int:
        """The port of the primary, as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
            try:
                _, primary = client.sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(primary)
            except redis.ConnectionError:
                continue
            finally:
                client.close()
        raise AssertionError("no sentinel answers")


class RedisClusterGroup(RedisProcesses):
    """Three primaries, each with one replica, on free loopback ports, without persistence.

    A primary that answers nothing for node_timeout_ms is called failed by the others and
    its replica takes over. Slots of a failed primary make only their own keys refuse
    (cluster-require-full-coverage no).
    """

    def __init__(self, directory: Path, *, node_timeout_ms: int = 1000) -> None:
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.ports = [free_port() for _ in range(6)]
        super().__init__()

    @property
    def url(self) -> str:
        """REDIS_URL for the service: every node, of which any one that answers will do."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports) + "/"

    def start(self) -> None:
        """Start six nodes, make them a cluster (a replica each), wait until every node agrees."""
        for port in self.ports:
            self.processes[port] = start_redis_process(
                "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.directory / f"nodes-{port}.conf"),
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-require-full-coverage", "no",
                "--save", "", "--appendonly", "no",
            )  # fmt: skip
        for port in self.ports:
            wait_for_redis(port)
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout.decode(errors="replace")[-2000:]
        self.wait_until_healthy()

    def restart_empty(self) -> None:
        """SIGKILL every node, then make a new, empty cluster on the same ports.

        Each node forgets its cluster (nodes-*.conf) and its data (a replica's full sync
        leaves an RDB file behind, which a starting node would load): new processes, so
        new run_ids, and slots assigned afresh.
        """
        self.stop()
        for path in [*self.directory.glob("nodes-*.conf"), *self.directory.glob("*.rdb")]:
            path.unlink()
        self.start()

    def nodes(self) -> list[dict[str, str]]:
        """CLUSTER NODES as the first node that answers sees it: port, role and flags."""
        for port in self.processes:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            try:
                text = client.execute_command("CLUSTER", "NODES")
            except redis.ConnectionError:
                continue
            finally:
                client.close()
            text = text.decode() if isinstance(text, bytes) else str(text)
            rows = []
            for line in text.splitlines():
                fields = line.split()
                address = fields[1].split("@", 1)[0]
                rows.append({"port": address.rsplit(":", 1)[1], "flags": fields[2]})
            return rows
        raise AssertionError("no cluster node answers")

    def primaries(self) -> list[int]:
        """Ports of the primaries that are not marked failed."""
        return sorted(
            int(row["port"])
            for row in self.nodes()
            if "master" in row["flags"] and "fail" not in row["flags"]
        )

    def wait_until_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every live node says the cluster is ok and every primary has a replica."""
        deadline = time.monotonic() + timeout
        while True:
            healthy = True
            for port in self.processes:
                client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
                try:
                    info = client.execute_command("CLUSTER", "INFO")
                    info = info.decode() if isinstance(info, bytes) else str(info)
                    replication = client.info("replication")
                finally:
                    client.close()
                if "cluster_state:ok" not in info:
                    healthy = False
                elif replication.get("role") == "master" and port in self.primaries():
                    healthy = healthy and int(replication.get("connected_slaves", 0)) >= 1
                elif replication.get("role") == "slave":
                    healthy = healthy and replication.get("master_link_status") == "up"
            if healthy:
                return
            assert time.monotonic() < deadline, "the cluster never became healthy"
            time.sleep(0.1)

    def move_slot(self, slot: int, to_port: int, *, batch: int = 10, pause: float = 0.0) -> None:
        """Move one slot and its keys to another primary, as `redis-cli --cluster reshard` does.

        The slot is MIGRATING on its primary and IMPORTING on the new one while its keys
        move, batch at a time (pause seconds after each); then every primary learns its
        new owner.
        """
        source = self.port_of_slot(slot)
        clients = {port: redis.Redis(host="127.0.0.1", port=port) for port in self.primaries()}
        try:
            ids = {port: c.execute_command("CLUSTER", "MYID") for port, c in clients.items()}
            clients[to_port].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
            clients[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to_port])
            while keys := clients[source].execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                clients[source].execute_command(
                    "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys
                )
                time.sleep(pause)
            for port in sorted(clients, key=lambda port: (port != to_port, port != source)):
                clients[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to_port])
        finally:
            for client in clients.values():
                client.close()

    def port_of_slot(self, slot: int) -> int:
        """The port of the primary that holds slot now."""
        client = redis.Redis(host="127.0.0.1", port=next(iter(self.processes)), socket_timeout=1)
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        finally:
            client.close()
        raise AssertionError(f"slot {slot} is not served")

    def port_of_key(self, key: str) -> int:
        """The port of the primary that holds key's slot now."""
        return self.port_of_slot(key_slot(key.encode()))


@contextmanager
def one_server_and_a_cluster(directory: Path) -> Iterator[tuple[int, RedisClusterGroup]]:
    """A Redis server (its port) and a 3-primary Cluster beside it, both stopped afterwards."""
    port = free_port()
    single = start_redis_process(
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"
    )  # fmt: skip
    cluster = RedisClusterGroup(directory)
    try:
        wait_for_redis(port)
        cluster.start()
        yield port, cluster
    finally:
        cluster.stop()
        single.kill()
        single.wait()
