"""Client-side load balancing: one SDK client, several servers, gRPC's round_robin per call.

Two real server processes on loopback serve the same repository; a client given both addresses sends 20
classifications; both servers' own request counters (their Prometheus ``transerve_requests_total``) rise, and
the answers are the ones a single server gives. Targets are parsed by ``transerve_client.targets``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import ServerProcess, metrics_text, running_server
from transerve_client import AsyncTranserveClient, TranserveClient
from transerve_client.loadtest import check_target
from transerve_client.targets import channel_target, target_hosts


def classify_count(server: ServerProcess) -> float:
    text = metrics_text(server)
    return sum(float(v) for v in re.findall(r'^transerve_requests_total\{[^}]*rpc="Classify"[^}]*\} (\S+)$', text,
                                            re.M))


def test_targets() -> None:
    assert channel_target("localhost:8001") == "localhost:8001"
    assert channel_target("127.0.0.1:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target(["localhost:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///models.example:8001") == "dns:///models.example:8001"
    assert target_hosts("dns:///models.example:8001") == ["models.example"]
    assert target_hosts("[::1]:1,[::1]:2") == ["::1", "::1"]
    for bad, words in (("a.example:1,b.example:2", "dns:///"), ("127.0.0.1:1,[::1]:2", "all IPv4"),
                       ("127.0.0.1", "not host:port"), ("", "no server")):
        with pytest.raises(ValueError, match=re.escape(words)):
            channel_target(bad)
    with pytest.raises(SystemExit, match=r"10\.0\.0\.2 in"):
        check_target("127.0.0.1:1,10.0.0.2:1", allow_remote=False)
    check_target("127.0.0.1:1,127.0.0.1:2", allow_remote=False)


def test_one_client_spreads_calls_over_two_servers(small_repo: Path) -> None:
    with (running_server(small_repo) as first, running_server(small_repo, "--max-connection-age", "60") as second):
        servers = [first, second]
        images = list(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
        before = [classify_count(s) for s in servers]
        with TranserveClient(servers[0].address) as single:
            expected = single.classify(images, top_k=3)
        with TranserveClient([s.address for s in servers]) as client:
            answers = [client.classify(images, top_k=3) for _ in range(20)]
        assert all(a == expected for a in answers)
        grown = [classify_count(s) - b for s, b in zip(servers, before, strict=True)]
        assert grown[0] >= 5 and grown[1] >= 5 and sum(grown) == 21, grown  # 20 balanced + the single call


def test_async_client_balances_too(small_repo: Path) -> None:
    import asyncio

    with running_server(small_repo) as first, running_server(small_repo) as second:
        servers = [first, second]
        before = [classify_count(s) for s in servers]

        async def main() -> None:
            images = [np.zeros((3, 8, 8), np.float32)]
            async with AsyncTranserveClient(",".join(s.address for s in servers)) as client:
                for _ in range(20):
                    await client.classify(images)

        asyncio.run(asyncio.wait_for(main(), 60))
        grown = [classify_count(s) - b for s, b in zip(servers, before, strict=True)]
        assert min(grown) >= 5 and sum(grown) == 20, grown
