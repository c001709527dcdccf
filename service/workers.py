"""Worker processes, each with its own listening sockets (SO_REUSEPORT).

Hypercorn's own multi-worker mode shares one listening socket between workers, and the
first worker to wake accepts every pending connection: 16 HTTP/2 clients connecting at
once all landed on one worker, leaving the other idle. With a socket per worker bound
to the same address, the kernel spreads new connections across the workers.
"""

from __future__ import annotations

import logging
import signal
import time
from multiprocessing import get_context
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_workers(config: Any) -> int:
    """Run config.workers Hypercorn workers until a signal or a worker's exit; exit status."""
    from hypercorn.asyncio.run import asyncio_worker, uvloop_worker

    worker = uvloop_worker if config.worker_class == "uvloop" else asyncio_worker
    context = get_context("spawn")
    shutdown_event = context.Event()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        shutdown_event.set()

    # As in Hypercorn: workers inherit SIG_IGN for SIGINT, so that a Ctrl-C reaches them
    # only as the shutdown event; a SIGTERM sent to a worker itself ends it at once.
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes: list[BaseProcess] = []
    listeners = []
    try:
        for _ in range(config.workers):
            sockets = config.create_sockets()
            listeners.append(sockets)
            process = context.Process(
                target=worker,
                kwargs={"config": config, "sockets": sockets, "shutdown_event": shutdown_event},
                daemon=config.daemon,
            )
            process.start()
            processes.append(process)
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop)
        wait([process.sentinel for process in processes])
        if not stopping:
            codes = [p.exitcode for p in processes if p.exitcode is not None]
            log.error("worker exited (status %s): stopping all", codes)
            shutdown_event.set()
        return _join(processes, config.graceful_timeout + config.shutdown_timeout, stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sockets in listeners:
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                sock.close()


def _join(processes: list[BaseProcess], limit: float, stopping: bool) -> int:
    """Wait for every worker (terminating stragglers); 0 only after a requested stop."""
    deadline = time.monotonic() + limit
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            process.terminate()
            process.join(5)
    clean = (0, -signal.SIGTERM)
    return 0 if stopping and all(process.exitcode in clean for process in processes) else 1
