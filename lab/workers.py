"""Runs of a comparison in worker processes that survive one of them dying.

Each worker is a spawned process (imports paid once per worker) that takes one job at a time over its own
pipe. The parent watches every worker's pipe and process: a worker that dies mid-run (SIGKILL, out of
memory) loses only its own run, which the parent reports as failed; the other workers go on, and a fresh
worker takes the queued runs. Ctrl-C reaches every worker (same process group): a running one saves and
reports "interrupted", no queued run starts, and KeyboardInterrupt is raised here once all have answered.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass
class Job:
    """One run: ``name`` for messages, ``args`` for the worker's target."""

    name: str
    args: tuple


@dataclass
class _Worker:
    process: Any
    conn: Connection
    job: Job | None = None


@dataclass
class PoolResult:
    """``results``: job name → the target's return value, or ``"failed: worker process killed ..."``."""

    results: dict[str, str] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)


def _worker_main(conn: Connection, init: Callable[..., None], stop: Any, target: Callable[..., str]) -> None:
    init(stop)
    while True:
        try:
            job = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if job is None:
            return
        conn.send(target(*job))


def death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"worker process killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"worker process killed by signal {-exitcode}"
    return f"worker process exited with code {exitcode} before reporting"


def run_jobs(
    jobs: Sequence[Job],
    *,
    workers: int,
    target: Callable[..., str],
    init: Callable[..., None],
    on_result: Callable[[Job, str], None],
    on_killed: Callable[[Job, str], None],
) -> PoolResult:
    """Run ``jobs`` on ``workers`` spawned processes; ``target(*job.args)`` must not raise (it returns a
    one-word result). ``on_result`` sees each result, ``on_killed`` each job whose worker died under it."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()  # set on Ctrl-C: a worker starts no queued run after it
    queue, pool, out = deque(jobs), [], PoolResult()

    def start_worker() -> None:
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child, init, stop, target))
        process.start()
        child.close()
        pool.append(_Worker(process, parent))

    def lose(worker: _Worker) -> None:
        worker.process.join()
        pool.remove(worker)
        if worker.job is not None:
            reason = f"failed: {death_reason(worker.process.exitcode)}"
            out.results[worker.job.name] = reason
            out.killed.append(worker.job.name)
            on_killed(worker.job, reason)
        if queue and not stop.is_set():
            start_worker()  # the queued runs still get their worker

    for _ in range(min(workers, len(queue))):
        start_worker()

    def dispatch() -> None:
        idle = [w for w in pool if w.job is None]
        while idle and queue and not stop.is_set():
            worker = idle.pop()
            worker.job = queue.popleft()
            try:
                worker.conn.send(worker.job.args)
            except OSError:  # it died while idle: the job goes back, a fresh worker takes it
                queue.appendleft(worker.job)
                worker.job = None
                lose(worker)
                idle = [w for w in pool if w.job is None]

    try:
        while True:
            dispatch()
            busy = [w for w in pool if w.job is not None]
            if not busy:
                break
            _collect(
                busy, wait([w.conn for w in busy] + [w.process.sentinel for w in busy]), out, on_result, lose
            )
    except KeyboardInterrupt:
        stop.set()
        while busy := [w for w in pool if w.job is not None]:  # each saves its run, then answers
            _collect(
                busy, wait([w.conn for w in busy] + [w.process.sentinel for w in busy]), out, on_result, lose
            )
        raise
    finally:
        for worker in pool:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in pool:
            worker.process.join(timeout=30)
    return out


def _collect(busy: list[_Worker], ready: list, out: PoolResult, on_result, lose) -> None:
    for worker in busy:
        if worker.conn in ready:
            try:
                result = worker.conn.recv()
            except EOFError:
                lose(worker)
                continue
            out.results[worker.job.name] = result
            on_result(worker.job, result)
            worker.job = None
        elif worker.process.sentinel in ready:
            lose(worker)
