"""How many RPC handlers are running, so that a drain can end gRPC's grace period once none is.

``grpc.aio.Server.stop(grace)`` returns when every call gRPC's core handed to the application has ended, or
when ``grace`` runs out. CI once saw a call sent as the drain began end ``DEADLINE_EXCEEDED`` at its 30 s
deadline, which no handler of ours answers in that time. The likeliest cause: a call the core matched in the
instant shutdown began but that reached no handler — by our reading of grpc.aio's serving loop, a
request-call result that lands after the loop stopped on another request-call's shutdown failure is dropped
(not reproduced in 90 stress rounds here). Such an orphan holds the grace period, and its client, for the
whole 30 s. Counting our own handlers tells the drain when only orphans can remain; it then cancels them
(their clients see ``CANCELLED`` at once, as for any call refused in that instant)."""

from __future__ import annotations

import asyncio


class ActiveCalls:
    """Handlers in progress on one gRPC server (each wrapped by :mod:`transerve.server.edge.malformed`)."""

    def __init__(self) -> None:
        self.count = 0

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1

    async def wait_idle(self, quiet: float, poll: float = 0.01) -> None:
        """Until no handler has run for ``quiet`` seconds. The quiet time covers a call gRPC already handed
        over whose handler task has not started yet (it starts on the loop's next turn)."""
        loop = asyncio.get_running_loop()
        idle_since: float | None = None
        while True:
            now = loop.time()
            if self.count:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= quiet:
                return
            await asyncio.sleep(poll)
