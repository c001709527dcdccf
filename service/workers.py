"""Worker processes, each with its own listening sockets (SO_REUSEPORT), kept running.

Hypercorn's own multi-worker mode shares one listening socket between workers, and the
first worker to wake accepts every pending connection: 16 HTTP/2 clients connecting at
once all landed on one worker, leaving the other idle. With a socket per worker bound
to the same address, the kernel spreads new connections across the workers.

A worker that dies is replaced on sockets of its own while the others go on serving. One
that dies again and again right after its start (a broken certificate, say) is restarted
after a growing pause, and after MAX_QUICK_EXITS such deaths in a row the service stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from service.exposition import process_ended

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
QUICK_EXIT = 10.0  # seconds: a worker that dies sooner after its start failed to start
MAX_QUICK_EXITS = 5  # failed starts in a row of one worker before the service gives up
FIRST_PAUSE = 0.5  # seconds before restarting after a failed start, doubled each time


def run_workers(config: Any) -> int:
    """Run config.workers workers, replacing those that die, until told to stop; exit status."""
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        return Supervisor(config, stop).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.close()


def serve_worker(config: Any, sockets: Any, shutdown_event: Any) -> None:
    """Run one Hypercorn worker until the shutdown event is set."""
    from service import logs, metrics
    from service.config import load_settings
    from service.transport.accept_gate import run_worker

    logs.configure(load_settings())
    metrics.worker_started()
    # As in Hypercorn: a Ctrl-C reaches a worker only as the shutdown event the master
    # sets; a SIGTERM sent to the worker itself ends it at once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    run_worker(config, sockets, shutdown_event)


class StopRequest:
    """The SIGINT/SIGTERM handler: sets a flag and wakes the supervisor through a pipe."""

    def __init__(self) -> None:
        self.requested = False
        self.wakeup, self._notify = os.pipe()
        os.set_blocking(self._notify, False)

    def __call__(self, *_: object) -> None:
        self.requested = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._notify, b".")

    def close(self) -> None:
        """Close the pipe."""
        os.close(self.wakeup)
        os.close(self._notify)


@dataclass
class Slot:
    """One of the config.workers places: its process and how its recent starts went."""

    process: BaseProcess | None = None
    started: float = 0.0
    quick_exits: int = 0
    due: float = 0.0


class Supervisor:
    """Keeps config.workers Hypercorn workers running until a stop is requested."""

    def __init__(self, config: Any, stop: StopRequest) -> None:
        self.config = config
        self.stop = stop
        self.context = get_context("spawn")
        self.shutdown_event = self.context.Event()
        self.slots = [Slot() for _ in range(config.workers)]

    def run(self) -> int:
        """Start the workers, keep them running, then stop them all; the exit status."""
        try:
            requested = self._keep_running()
        finally:
            self.shutdown_event.set()
        return self._join(requested)

    def _keep_running(self) -> bool:
        """Start and replace workers: True on a stop request, False when starts keep failing."""
        while not self.stop.requested:
            if not self._start_due():
                return False
            ready = wait([*self._sentinels(), self.stop.wakeup], self._until_due())
            if not self.stop.requested and not self._reap(ready):
                return False
        return True

    def _start_due(self) -> bool:
        """Start a worker in every empty slot whose pause is over; False to give up."""
        now = time.monotonic()
        due = [slot for slot in self.slots if slot.process is None and slot.due <= now]
        return all(self._start(slot) for slot in due if not self.stop.requested)

    def _start(self, slot: Slot) -> bool:
        """Start a worker on sockets of its own; False to give up."""
        slot.started = time.monotonic()
        try:
            sockets = self.config.create_sockets()
        except OSError as exc:
            return self._after_exit(slot, f"a new worker cannot listen ({exc.strerror})")
        try:
            slot.process = self._spawn(sockets)
        finally:
            # The worker holds its own copies now. Copies kept open here would go on
            # queueing connections after the worker stops accepting: a stop would leave
            # clients hanging instead of refused.
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets, *sockets.quic_sockets]:
                sock.close()
        return True

    def _spawn(self, sockets: Any) -> BaseProcess:
        """Start a worker process serving sockets."""
        process = self.context.Process(
            target=serve_worker,
            kwargs={
                "config": self.config,
                "sockets": sockets,
                "shutdown_event": self.shutdown_event,
            },
            daemon=self.config.daemon,
        )
        # SIGINT is blocked while the worker starts, and the worker inherits the block until
        # it ignores SIGINT (serve_worker): a Ctrl-C meanwhile reaches the master's handler,
        # never the new worker half-way through its imports.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return process

    def _sentinels(self) -> list[int]:
        """What wait() watches for each running worker: readable once it has exited."""
        return [slot.process.sentinel for slot in self.slots if slot.process is not None]

    def _until_due(self) -> float | None:
        """Seconds until the next pending start, or None if none is pending."""
        pending = [slot.due for slot in self.slots if slot.process is None]
        return max(0.0, min(pending) - time.monotonic()) if pending else None

    def _reap(self, ready: list[Any]) -> bool:
        """Log each worker that died and plan its replacement; False to give up."""
        for slot in self.slots:
            if slot.process is not None and slot.process.sentinel in ready:
                process, slot.process = slot.process, None
                process.join()
                process_ended(process.pid)
                if not self._after_exit(slot, f"worker {process.pid} {_ending(process)}"):
                    return False
        return True

    def _after_exit(self, slot: Slot, what: str) -> bool:
        """Log what ended slot's worker, with the pause before the next start; False to give up."""
        now = time.monotonic()
        quick = now - slot.started < QUICK_EXIT
        slot.quick_exits = slot.quick_exits + 1 if quick else 0
        if slot.quick_exits >= MAX_QUICK_EXITS:
            log.error(
                "%s; the last %d workers in its place died within %g s of their start: "
                "stopping the service",
                what,
                slot.quick_exits,
                QUICK_EXIT,
            )
            return False
        pause = FIRST_PAUSE * 2 ** (slot.quick_exits - 1) if quick else 0.0
        slot.due = now + pause
        log.error("%s: starting another%s", what, f" in {pause:g} s" if pause else "")
        return True

    def _join(self, requested: bool) -> int:
        """Wait for every worker (terminating stragglers); 0 only after a clean requested stop."""
        limit = self.config.graceful_timeout + self.config.shutdown_timeout
        deadline = time.monotonic() + limit
        processes = [slot.process for slot in self.slots if slot.process is not None]
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.terminate()
                process.join(5)
        clean = (0, -signal.SIGTERM)
        return 0 if requested and all(p.exitcode in clean for p in processes) else 1


def _ending(process: BaseProcess) -> str:
    """How a worker ended, for the log: its exit status or the signal that killed it."""
    code = process.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with status {code}"
