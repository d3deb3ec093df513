"""Worker pools with every thread started up front.

``ThreadPoolExecutor`` starts a thread only when a job finds none idle, so a pool grows under the first burst
big enough to fill it, long after start-up, and never shrinks. Started whole, a pool holds the same threads
from the first request to the last: the process's thread count is fixed once it serves, which is what an
operator (and the leak checks of the reliability tests) can watch.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor


def default_workers() -> int:
    """The size asyncio's own default executor would take (``min(32, cpus + 4)``)."""
    return min(32, (os.cpu_count() or 1) + 4)


def started_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, all running before it is returned.

    Each of ``workers`` jobs waits on a barrier until all have arrived, so no job finds an idle thread and the
    pool must start one thread per job."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    barrier = threading.Barrier(workers)
    for job in [pool.submit(barrier.wait) for _ in range(workers)]:
        job.result()
    return pool
