"""Server behaviour under load, limits, security and shutdown — each case its own real server process."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ServerProcess, running_server, scrape, start_server, wait_for
from reliability import record_figures
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc


def tuned_repo(small_repo: Path, tmp_path: Path, **batching: float) -> Path:
    """A copy of the small repository with the ViT's batching settings changed."""
    repo = tmp_path / "repo"
    shutil.copytree(small_repo, repo)
    config_path = repo / "tiny-vit" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["max_batch_size"] = int(batching.pop("max_batch_size", config["max_batch_size"]))
    config["batching"].update(batching)
    config["batching"]["preferred_batch_sizes"] = []
    config["batching"]["flush_when_idle"] = False  # these tests rely on the delay
    config_path.write_text(yaml.safe_dump(config))
    return repo


def zeros_request(images: int = 1) -> pb.ModelInferRequest:
    """KServe ModelInfer of ``images`` blank 8×8 images for the small repository's ViT."""
    request = pb.ModelInferRequest(model_name="tiny-vit")
    request.inputs.add(name="images", datatype="FP32", shape=[images, 3, 8, 8])
    request.raw_input_contents.append(np.zeros((images, 3, 8, 8), "<f4").tobytes())
    return request


def infer(stub: pb_grpc.GRPCInferenceServiceStub, timeout: float | None = None) -> grpc.StatusCode:
    try:
        stub.ModelInfer(zeros_request(), timeout=timeout)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_overload_sheds_with_resource_exhausted(small_repo: Path, tmp_path: Path) -> None:
    with running_server(tuned_repo(small_repo, tmp_path, max_batch_size=1, max_queue_size=1,
                                   max_queue_delay_ms=20)) as server:
        with grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(32) as pool:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            codes = list(pool.map(lambda _: infer(stub), range(64)))
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0 and codes.count(grpc.StatusCode.OK) > 0


def test_expired_request_is_dropped_before_compute(small_repo: Path, tmp_path: Path) -> None:
    with (running_server(tuned_repo(small_repo, tmp_path, max_queue_delay_ms=1500)) as server,
          grpc.insecure_channel(server.address) as channel):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny-vit")).model_stats[0]
        assert infer(stub, timeout=0.2) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert infer(stub) == grpc.StatusCode.OK  # waits out the 1.5 s delay, then runs alone
        after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny-vit")).model_stats[0]
        assert after.execution_count == before.execution_count + 1
        assert after.inference_count == before.inference_count + 1  # the expired one never ran


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_sigterm_finishes_accepted_work_and_exits_zero(small_repo: Path, tmp_path: Path, event_loop: str) -> None:
    server = start_server(tuned_repo(small_repo, tmp_path, max_queue_delay_ms=800), "--event-loop", event_loop)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = zeros_request()
            pending = [stub.ModelInfer.future(request) for _ in range(8)]  # held ~0.8 s in the batcher
            wait_until_queued(server, "tiny-vit", 8)  # accepted: all eight are in the model's queue
            assert server.terminate() == 0
            assert [f.code() for f in pending] == [grpc.StatusCode.OK] * 8
        assert any("draining" in line for line in server.output)
    finally:
        if server.process.poll() is None:
            server.process.kill()


def wait_until_queued(server: ServerProcess, model: str, count: int, timeout: float = 10) -> None:
    """Poll /metrics (bounded) until the model's queue holds ``count`` items."""
    key = f'transerve_queue_length{{model="{model}"}}'
    wait_for(lambda: scrape(server).get(key, 0.0) >= count, timeout, f"{model}: {count} requests in the queue")


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(name: str, key, issuer_name, issuer_key, ca: bool, san: bool):  # type: ignore[no-untyped-def]
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    files: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "transerve test CA")])
    ca = cert("transerve test CA", ca_key, ca_name, ca_key, True, False)
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{role}.key"] = directory / f"{role}.key"
        files[f"{role}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        files[f"{role}.crt"] = directory / f"{role}.crt"
        files[f"{role}.crt"].write_bytes(cert(role, key, ca_name, ca_key, False, True)
                                         .public_bytes(serialization.Encoding.PEM))
    files["ca.crt"] = directory / "ca.crt"
    files["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return files


def test_mutual_tls(small_repo: Path, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    with running_server(small_repo, "--tls-cert", str(certs["server.crt"]), "--tls-key", str(certs["server.key"]),
                        "--tls-client-ca", str(certs["ca.crt"])) as server:
        ca = certs["ca.crt"].read_bytes()
        with_client = grpc.ssl_channel_credentials(ca, certs["client.key"].read_bytes(),
                                                   certs["client.crt"].read_bytes())
        with grpc.secure_channel(server.address, with_client) as channel:
            assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest()).live
        no_client_cert = grpc.ssl_channel_credentials(ca)
        with grpc.secure_channel(server.address, no_client_cert) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):  # plaintext to TLS
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)


def test_broken_entry_is_unavailable_not_fatal(small_repo: Path, tmp_path: Path) -> None:
    repo = tuned_repo(small_repo, tmp_path)
    (repo / "tiny-mt" / "1" / "decoder_step_ragged.onnx").write_bytes(b"corrupt")
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert index["tiny-vit"].state == "READY" and index["tiny-mt"].state == "UNAVAILABLE"
        reason = index["tiny-mt"].reason
        assert "decoder_step_ragged.onnx" in reason or "INVALID_PROTOBUF" in reason
        assert infer(stub) == grpc.StatusCode.OK
        health = health_pb2_grpc.HealthStub(channel)  # SERVING for the rest, NOT_SERVING for the broken one
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="tiny-mt")).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny-mt")).ready


def test_json_access_log_carries_request_ids(small_repo: Path) -> None:
    """--log-format json --access-log: one JSON line per RPC; the client's x-request-id is used, an unusable one
    is replaced, and a failed request returns the id it was logged under in its trailing metadata."""
    with running_server(small_repo, "--log-format", "json", "--access-log", clean_exit=False) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = zeros_request()
            stub.ModelInfer(request, metadata=(("x-request-id", "trace-42"),))
            stub.ModelInfer(request, metadata=(("x-request-id", "has spaces; and more"),))
            with pytest.raises(grpc.RpcError) as failed:
                stub.ModelInfer(pb.ModelInferRequest(model_name="no-such-model"))
        error_id = dict(failed.value.trailing_metadata() or ())["x-request-id"]
        lines = wait_for_access_lines(server, 3)
        assert all(line["logger"] == "transerve.access" and line["rpc"] == "ModelInfer" and line["ms"] > 0
                   for line in lines)
        ok_given, ok_drawn, not_found = lines
        assert (ok_given["request_id"], ok_given["model"], ok_given["code"]) == ("trace-42", "tiny-vit", "OK")
        assert ok_drawn["code"] == "OK" and re.fullmatch(r"[0-9a-f]{16}", ok_drawn["request_id"])
        assert (not_found["request_id"], not_found["code"]) == (error_id, "NOT_FOUND")


def wait_for_access_lines(server: ServerProcess, count: int, timeout: float = 10) -> list[dict[str, object]]:
    """The server's JSON access-log lines, once ``count`` have been written (bounded wait)."""
    def lines() -> list[dict[str, object]]:
        return [json.loads(line) for line in list(server.output) if '"transerve.access"' in line]

    wait_for(lambda: len(lines()) >= count, timeout, f"{count} access-log lines")
    return lines()


def test_message_size_limit_is_configurable_and_named(small_repo: Path) -> None:
    """--max-message-mb 1: a 2 MiB request is refused with RESOURCE_EXHAUSTED naming both sizes; the server
    keeps answering requests under the limit."""
    with (running_server(small_repo, "--max-message-mb", "1", clean_exit=False) as server,
          grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 8 << 20)]) as channel):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(zeros_request(2731))  # 2 MiB
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert re.search(r"larger than max \(\d+ vs\. 1048576\)", refused.value.details() or "")
        assert infer(stub) == grpc.StatusCode.OK


def test_plaintext_health_port_answers_probes_when_tls_and_auth_are_on(small_repo: Path, tmp_path: Path) -> None:
    """Kubernetes' gRPC probes send neither TLS nor a token: --health-port serves grpc.health.v1 for them."""
    import re

    certs = make_certificates(tmp_path)
    token = tmp_path / "token"
    token.write_text("t0ken")
    with running_server(small_repo, "--tls-cert", str(certs["server.crt"]), "--tls-key", str(certs["server.key"]),
                        "--auth-token-file", str(token), "--health-port", "0") as server:
        match = re.search(r"\(health on 127\.0\.0\.1:(\d+)\)", "".join(server.output))
        assert match is not None, "".join(server.output[-5:])
        with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "tiny-vit", "inference.GRPCInferenceService"):
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING, service
            with pytest.raises(grpc.RpcError) as info:  # nothing but health there
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):  # serving port: TLS
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def wait_for_load(clients: list[Future[None]], codes: list[grpc.StatusCode], calls: int) -> None:
    """Until the clients have made ``calls`` calls (a client that died raises here), within 60 s."""
    deadline = time.monotonic() + 60
    while len(codes) < calls:
        for c in clients:
            if c.done():
                c.result()
        assert time.monotonic() < deadline, "no load"
        threading.Event().wait(0.01)


def test_sigterm_under_steady_load_loses_nothing(small_repo: Path) -> None:
    """Kubernetes' order: SIGTERM → health NOT_SERVING at once while RPCs are still served (--drain-delay) →
    new RPCs refused with UNAVAILABLE → accepted ones finished → exit 0. Four clients send back to back
    throughout; every call the server accepted ends OK, the others were refused before acceptance."""
    server = start_server(small_repo, "--drain-delay", "2", "--access-log")
    codes: list[grpc.StatusCode] = []
    health_seen: list[tuple[float, int]] = []
    sigterm_at: list[float] = []

    def client() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not codes or codes[-1] != grpc.StatusCode.UNAVAILABLE:
                codes.append(infer(stub, timeout=30))
                if len(codes) > 20000:
                    raise AssertionError("the server never stopped accepting")

    def watch_health() -> None:
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                except grpc.RpcError:
                    return
                health_seen.append((time.monotonic(), status))
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    return

    try:
        with ThreadPoolExecutor(5) as pool:
            clients = [pool.submit(client) for _ in range(4)]
            wait_for_load(clients, codes, 200)
            watcher = pool.submit(watch_health)
            sigterm_at.append(time.monotonic())
            server.process.send_signal(signal.SIGTERM)
            watcher.result(timeout=30)
            for c in clients:
                c.result(timeout=60)
        assert server.process.wait(60) == 0
        exited_after = time.monotonic() - sigterm_at[0]
    finally:
        if server.process.poll() is None:
            server.process.kill()
    # a call gRPC accepted but handed to no handler must not hold the drain for its 30 s grace period
    assert exited_after < 15, f"the server took {exited_after:.1f} s to exit after SIGTERM (drain delay 2 s)"
    refused_at = health_seen[-1][0] - sigterm_at[0]
    assert health_seen[-1][1] == health_pb2.HealthCheckResponse.NOT_SERVING and refused_at < 1.5, health_seen[-3:]
    counts = {code.name: codes.count(code) for code in set(codes)}
    served = Counter(re.findall(r"ModelInfer on tiny-vit → (\w+) ", "".join(server.output)))
    # Every call the server accepted (its access log) ended OK, and the client saw each of those OK: nothing
    # accepted was lost or cut short. The rest were refused before any handler ran — UNAVAILABLE, or CANCELLED
    # for a call gRPC's transport received in the instant it shut down (it never reached a handler either; the
    # drain cancels one gRPC accepted but handed to no handler, server/edge/active_calls.py).
    assert served["OK"] == counts["OK"] >= 200 and sum(served.values()) == served["OK"], (counts, served)
    refused = len(codes) - counts["OK"]
    assert set(counts) <= {"OK", "UNAVAILABLE", "CANCELLED"} and 1 <= refused <= 8, counts
    log = "".join(server.output)
    assert "still accepting for 2 s" in log and "draining" in log
    record_figures("shutdown.sigterm_under_load", sent=len(codes), answered_ok=counts["OK"],
                   refused_before_acceptance=refused, refused_by_status={k: v for k, v in counts.items() if k != "OK"},
                   lost=served["OK"] - counts["OK"], not_serving_after_s=refused_at)


def test_no_model_loaded_is_never_serving(small_repo: Path, tmp_path: Path) -> None:
    repo = tuned_repo(small_repo, tmp_path)
    for name in ("tiny-vit", "tiny-mt"):
        for graph in (repo / name / "1").glob("*.onnx"):
            graph.write_bytes(b"corrupt")
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tiny-vit", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING, service
        assert not pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest()).ready
    assert any("NOT_SERVING, no model loaded" in line for line in server.output)


def test_port_in_use_exits_non_zero_with_one_clear_line(small_repo: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "transerve", "serve", "--repo", str(small_repo), "--port",
                                 str(port), "--metrics-port", "-1", "--no-http"], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: cannot listen on 127.0.0.1:{port}: the port is in use or the address is not this " \
                   "machine's (choose another --port / --host)", result.stderr[-2000:]


def test_a_model_still_loading_is_unavailable_not_missing(small_repo: Path) -> None:
    """The port listens before the first load ends (health says NOT_SERVING meanwhile): a request that reaches
    it then must be told to retry (UNAVAILABLE), not that the model does not exist (NOT_FOUND), or a client
    failing over to a restarting server gives up. Names the repository lacks stay NOT_FOUND throughout."""
    import asyncio

    from transerve.server.edge.rpc import status_of
    from transerve.server.engine.loaded_model import Limits
    from transerve.server.engine.manager import ModelManager
    from transerve.server.engine.metrics import Metrics
    from transerve.server.exceptions import ModelNotFound

    def code(call: Any) -> grpc.StatusCode | None:
        try:
            call()
        except ModelNotFound as e:
            return status_of(e)
        return grpc.StatusCode.OK

    async def scenario() -> list[grpc.StatusCode | None]:
        manager = ModelManager(small_repo, "onnxruntime", Metrics(), Limits())
        before = [code(lambda: manager.get("tiny-vit")), code(lambda: manager.default_for("translate")),
                  code(lambda: manager.get("not-an-entry")), code(lambda: manager.get("../tiny-vit"))]
        await manager.load_all()
        try:
            after = [code(lambda: manager.get("tiny-vit")), code(lambda: manager.default_for("translate")),
                     code(lambda: manager.get("not-an-entry")), code(lambda: manager.default_for("tensor"))]
        finally:
            await manager.aclose(5)
        return before + after

    U, N, OK = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK
    assert asyncio.run(scenario()) == [U, U, N, N, OK, OK, N, N]
