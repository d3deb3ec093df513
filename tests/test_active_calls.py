"""Counting running handlers (what lets a drain end gRPC's grace period once only orphaned calls remain)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from helpers import until
from transerve.server.edge.active_calls import ActiveCalls
from transerve.server.edge.malformed import Malformed, safe_handler


class Context:
    """What the wrappers use of a servicer context: abort raises, as grpc.aio's does."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


def identity(data: bytes) -> bytes:
    return data


async def drive(behaviour: Any, request: Any, streamed: bool) -> Any:
    outcome = behaviour(request, Context())
    if streamed:
        return [item async for item in outcome]
    return await outcome


class Probe:
    """A handler of each kind that records how many handlers run when it starts, waits to be released, and
    fails for the request ``b"boom"``."""

    def __init__(self, calls: ActiveCalls) -> None:
        self.calls, self.seen, self.release = calls, [], asyncio.Event()

    async def answer(self, request: Any) -> str:
        self.seen.append(self.calls.count)
        await self.release.wait()
        if b"boom" in (request if isinstance(request, list) else [request]):
            raise ValueError("handler failed")
        return "done"

    def behaviour(self, kind: str) -> Any:
        async def unary(request: Any, context: Any) -> str:
            return await self.answer(await read(request) if kind.startswith("stream") else request)

        async def streamed(request: Any, context: Any) -> AsyncIterator[str]:
            yield await unary(request, context)

        make = getattr(grpc, f"{kind}_rpc_method_handler")
        handler = make(streamed if kind.endswith("stream") else unary, identity, identity)
        return getattr(safe_handler(handler, self.calls), kind)


async def read(requests: AsyncIterator[bytes]) -> list[bytes]:
    return [r async for r in requests]


async def one(item: bytes) -> AsyncIterator[bytes]:
    yield item


@pytest.mark.parametrize("kind", ["unary_unary", "unary_stream", "stream_unary", "stream_stream"])
def test_every_handler_kind_is_counted_while_it_runs_and_after_it_fails(kind: str) -> None:
    probe = Probe(ActiveCalls())

    async def scenario() -> tuple[Any, int, str, int]:
        behaviour, wrap = probe.behaviour(kind), (one if kind.startswith("stream") else bytes)
        ok = asyncio.ensure_future(drive(behaviour, wrap(b"fine"), kind.endswith("stream")))
        bad = asyncio.ensure_future(drive(behaviour, wrap(b"boom"), kind.endswith("stream")))
        await until(lambda: len(probe.seen) >= 2, "both calls inside the handler")
        running = probe.calls.count
        probe.release.set()
        with pytest.raises(ValueError) as failure:
            await bad
        return await ok, running, str(failure.value), probe.calls.count

    result, running, failure, after = asyncio.run(scenario())
    assert result in ("done", ["done"]) and failure == "handler failed"
    assert probe.seen[0] >= 1 and running == 2 and after == 0


def test_a_refused_malformed_request_is_counted_and_released() -> None:
    calls = ActiveCalls()

    async def never(request: Any, context: Any) -> None:
        raise AssertionError("a malformed request must not reach the handler")

    behaviour = safe_handler(grpc.unary_unary_rpc_method_handler(never, identity, identity), calls).unary_unary
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        asyncio.run(behaviour(Malformed("bad bytes"), Context()))
    assert calls.count == 0


def test_wait_idle_waits_for_the_last_handler_and_then_the_quiet_time() -> None:
    calls = ActiveCalls()

    async def scenario() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        calls.enter()
        idle = asyncio.ensure_future(calls.wait_idle(quiet=0.05, poll=0.005))
        await asyncio.sleep(0.2)
        still_waiting = not idle.done()  # a running handler holds it however long
        left_at = loop.time()
        calls.leave()
        await idle
        return still_waiting, loop.time() - left_at

    still_waiting, after = asyncio.run(scenario())
    assert still_waiting and 0.05 <= after < 1.0
