"""Pools started whole: every thread runs before the first job, and a burst adds none."""

from __future__ import annotations

import threading

from transerve.server.engine.pools import started_pool


def pool_threads(prefix: str) -> int:
    return sum(t.name.startswith(f"{prefix}_") for t in threading.enumerate())


def test_every_thread_runs_before_the_first_job() -> None:
    pool = started_pool(5, "started-test")
    try:
        assert pool_threads("started-test") == 5
        release = threading.Event()
        jobs = [pool.submit(release.wait, 10) for _ in range(20)]  # a burst four times the pool's size
        release.set()
        assert all(job.result() for job in jobs)
        assert pool_threads("started-test") == 5
    finally:
        pool.shutdown(wait=True)
    assert pool_threads("started-test") == 0

