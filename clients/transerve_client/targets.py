"""Where a client connects: one server, several, or a DNS name — balanced per call by gRPC itself.

``"host:port"`` is one server. ``"10.0.0.1:8001,10.0.0.2:8001"`` (or a list of addresses) becomes gRPC's
``ipv4:``/``ipv6:`` target with every address, and ``"dns:///name:port"`` resolves to every address the name
has. In each case the channel uses gRPC's ``round_robin`` policy: it keeps a connection to every address
and sends each call to the next one, so one client spreads its load over all replicas (with one address it
behaves like the default). Hostnames other than ``localhost`` cannot be listed — put them behind a DNS name.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Final

ROUND_ROBIN: Final = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))
SCHEMES: Final = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port), with a clear error for anything else."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def channel_target(addresses: str | Sequence[str]) -> str:
    """The gRPC target for one address, a comma-separated list, a list, or a ``dns:///`` name."""
    if isinstance(addresses, str):
        if addresses.startswith(SCHEMES):
            return addresses
        addresses = [a for a in addresses.split(",") if a.strip()]
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        split_address(addresses[0])  # a clear error now rather than a connection that never comes up
        return addresses[0].strip()
    parsed = [split_address(a) for a in addresses]
    hosts = ["127.0.0.1" if h == "localhost" else h for h, _ in parsed]
    try:
        versions = {ipaddress.ip_address(h).version for h in hosts}
    except ValueError:
        raise ValueError(f"several addresses must be IP literals ({', '.join(addresses)}); for host names use "
                         "one dns:///name:port target") from None
    if versions == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, (_, p) in zip(hosts, parsed, strict=True))
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, (_, p) in zip(hosts, parsed, strict=True))
    raise ValueError("several addresses must be all IPv4 or all IPv6")


def target_hosts(addresses: str | Sequence[str]) -> list[str]:
    """The hosts a target names (for the load test's loopback check); a ``dns:///`` name is its host."""
    target = channel_target(addresses)
    if target.startswith("dns:"):
        return [split_address(target.split("/")[-1])[0]]
    if target.startswith(("ipv4:", "ipv6:")):
        return [split_address(a)[0] for a in target.split(":", 1)[1].split(",")]
    if target.startswith(("unix:", "unix-abstract:")):
        return ["localhost"]
    return [split_address(target)[0]]


__all__ = ["ROUND_ROBIN", "channel_target", "split_address", "target_hosts"]
