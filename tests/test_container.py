"""The image for real: build deploy/Dockerfile with podman on a local base, serve the zoo, drain on SIGTERM.

No registry is reachable here, so the base image is built locally: ``debootstrap --variant=minbase`` with
python3 and python3-venv (Debian bookworm: Python 3.11), then ``podman import``. The image is built with
that base (``--build-arg BASE``), run with ``--network host`` on ephemeral loopback ports and the zoo
repository mounted read-only at /mnt/models, polled with its own HEALTHCHECK until healthy, asked one Classify
and one Translate — the same answers as the single-process server — then stopped (SIGTERM): exit 0 within
the drain grace. In CI (``CI=true``) podman and debootstrap are installed with apt and a failure to do so
fails the test; elsewhere a machine without them skips, saying why.

Facts this needs (measured here): podman as root wants ``default_ulimits`` in a containers.conf, ``--runtime
runc --cgroup-manager cgroupfs``, ``--format docker`` to keep HEALTHCHECK, and pip inside the build the
host's network and CA bundle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, running_server
from transerve_client import TranserveClient

pytestmark = [pytest.mark.container, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/transerve-base:bookworm"
IMAGE = "localhost/transerve:test"
CA = Path("/etc/ssl/certs/ca-certificates.crt")


def ensure_tools() -> None:
    missing = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    if not missing:
        return
    if os.environ.get("CI") != "true":
        pytest.skip(f"{', '.join(missing)} not installed (CI installs them with apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                "podman", "buildah", "runc", "debootstrap", "uidmap"]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, f"{' '.join(cmd)} failed in CI:\n{out.stderr[-2000:]}"


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    ensure_tools()
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n')
    os.environ["CONTAINERS_CONF"] = str(conf)
    try:
        yield ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
    finally:
        os.environ.pop("CONTAINERS_CONF", None)


def run(cmd: list[str], timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{' '.join(cmd[:6])} … failed:\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}"
    return out  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def image(podman: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    if subprocess.run([*podman, "image", "exists", BASE]).returncode != 0:
        rootfs = tmp_path_factory.mktemp("rootfs")
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
             str(rootfs)], timeout=1200)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run([*podman, "import", "-", BASE], stdin=tar.stdout)
        tar.wait(60)
    run([*podman, "build", "--format", "docker", "--network", "host", "--build-arg", f"BASE={BASE}",
         "-v", f"{CA}:/etc/ssl/certs/host-ca.crt:ro", "--env", "PIP_CERT=/etc/ssl/certs/host-ca.crt",
         "-f", "deploy/Dockerfile", "-t", IMAGE, "."], cwd=ROOT, timeout=1500)
    size = run([*podman, "image", "inspect", IMAGE, "--format", "{{.Size}}"]).stdout.strip()
    print(f"image {IMAGE}: {int(size) / 2**20:.0f} MiB")
    return IMAGE


def answers(address: str) -> tuple[list[str], list[list[tuple[str, float]]]]:
    images = list(np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
    with TranserveClient(address, timeout=60) as client:
        texts = client.translate(["three hundred and forty-two", "nineteen eighty-four"])
        top = [[(p.label, round(p.score, 6)) for p in row] for row in client.classify(images, model="vit-digits")]
    return texts, top


def test_image_serves_the_zoo_and_drains_on_sigterm(podman: list[str], image: str, zoo_repo: Path,
                                                    tmp_path: Path) -> None:
    mounted = tmp_path / "models"
    shutil.copytree(zoo_repo, mounted)
    run(["chmod", "-R", "a+rX", str(mounted)])  # the image runs as uid 10001
    port, metrics, http_port = free_port(), free_port(), free_port()
    name = f"transerve-test-{port}"
    run([*podman, "run", "-d", "--name", name, "--network", "host", "-e", f"TRANSERVE_PORT={port}",
         "-e", f"TRANSERVE_METRICS_PORT={metrics}", "-e", f"TRANSERVE_HTTP_PORT={http_port}",
         "-v", f"{mounted}:/mnt/models:ro", image, "serve", "--repo", "/mnt/models", "--host", "127.0.0.1",
         "--grace", "20", "--precision", "fp32"])  # the image has no OpenVINO: fp32 answers alike everywhere
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([*podman, "healthcheck", "run", name], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, run([*podman, "logs", name]).stderr[-3000:]
            time.sleep(0.5)  # polling the container's own health check, bounded by the deadline
        with running_server(zoo_repo, "--precision", "fp32") as single:
            assert answers(f"127.0.0.1:{port}") == answers(single.address)
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=10) as ready:
                assert ready.status == 200  # the image serves REST too (TRANSERVE_HTTP_PORT)
        began = time.monotonic()
        run([*podman, "stop", "-t", "40", name], timeout=60)
        assert time.monotonic() - began < 25  # drained within --grace (20 s), not killed at -t 40
        state = run([*podman, "inspect", name, "--format", "{{.State.ExitCode}}"]).stdout.strip()
        assert state == "0"
    finally:
        subprocess.run([*podman, "rm", "-f", name], capture_output=True, timeout=60)
