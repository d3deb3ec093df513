"""Access control, tried as an outsider would: tokens, repository control, paths through model names.

A real server on loopback each time. Repository control (``RepositoryModelLoad`` / ``Unload``) is off unless
admin tokens are configured, and then only an admin token opens it; a model name is an entry name, never a
path (``../``, absolute paths, percent-escapes, NUL → ``INVALID_ARGUMENT``); a repository entry that is a
symlink out of the repository is neither listed nor loadable; user tokens rotate (several accepted), work for
unary and streaming calls, are never needed for health and never appear in the logs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ServerProcess, running_server
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

USER_TOKENS = ["old-t0ken-4f1d", "new-t0ken-9c2e"]  # both valid during a rotation
ADMIN_TOKEN = "adm1n-t0ken-77aa"
TRAVERSALS = ["../tiny-mt", "/etc", "..", "%2e%2e", "tiny-mt/../tiny-mt", "a\x00b", "", " tiny-mt", "x" * 200]


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code(), info.value.details() or ""


@pytest.fixture(scope="module")
def guarded(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    files = tmp_path_factory.mktemp("tokens")
    (files / "tokens").write_text("# rotate: add the new token, move clients over, remove the old one\n"
                                  + "\n".join(USER_TOKENS) + "\n")
    (files / "admin").write_text(ADMIN_TOKEN + "\n")
    with running_server(small_repo, "--auth-token-file", str(files / "tokens"), "--admin-token-file",
                        str(files / "admin"), "--log-level", "debug", "--access-log") as server:
        yield server
    log = "".join(server.output)
    assert "model tiny-mt version" in log  # the capture holds the server's log lines
    assert not any(t in log for t in [*USER_TOKENS, ADMIN_TOKEN]), "a token reached the log"


def test_tokens_rotate_cover_streams_and_spare_health(guarded: ServerProcess) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        translator = tpb_grpc.TranslatorStub(channel)
        request = tpb.TranslateRequest(texts=["seven"])
        for metadata in ([], bearer("wrong"), bearer(USER_TOKENS[0] + "x"), [("authorization", USER_TOKENS[0])]):
            assert code_of(lambda m=metadata: translator.Translate(request, metadata=m))[0] == \
                grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda m=metadata: list(translator.TranslateStream(
                tpb.TranslateStreamRequest(text="seven"), metadata=m)))[0] == grpc.StatusCode.UNAUTHENTICATED
        answers = {translator.Translate(request, metadata=bearer(t)).translations[0].text for t in USER_TOKENS}
        assert len(answers) == 1  # either token, the same answer
        pieces = list(translator.TranslateStream(tpb.TranslateStreamRequest(text="seven"),
                                                 metadata=bearer(USER_TOKENS[1])))
        assert "".join(p.piece for p in pieces) == answers.pop()
        health = health_pb2_grpc.HealthStub(channel)  # Kubernetes' probes carry no token
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_repository_control_takes_the_admin_token(guarded: ServerProcess) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        unload = pb.RepositoryModelUnloadRequest(model_name="tiny-mt")
        code, message = code_of(lambda: kserve.RepositoryModelUnload(unload, metadata=bearer(USER_TOKENS[0])))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "admin token" in message
        index = kserve.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=bearer(USER_TOKENS[0]))
        assert {m.name: m.state for m in index.models} == {"tiny-mt": "READY", "tiny-vit": "READY"}

        kserve.RepositoryModelUnload(unload, metadata=bearer(ADMIN_TOKEN))
        assert not kserve.ModelReady(pb.ModelReadyRequest(name="tiny-mt"), metadata=bearer(ADMIN_TOKEN)).ready
        code, _ = code_of(lambda: tpb_grpc.TranslatorStub(channel).Translate(
            tpb.TranslateRequest(texts=["seven"]), metadata=bearer(USER_TOKENS[0])))
        assert code == grpc.StatusCode.NOT_FOUND
        kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny-mt"), metadata=bearer(ADMIN_TOKEN))
        assert kserve.ModelReady(pb.ModelReadyRequest(name="tiny-mt"), metadata=bearer(ADMIN_TOKEN)).ready

        for name in TRAVERSALS:
            for call in (lambda n: kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=n),
                                                              metadata=bearer(ADMIN_TOKEN)),
                         lambda n: kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=n),
                                                                metadata=bearer(ADMIN_TOKEN))):
                code, message = code_of(lambda c=call, n=name: c(n))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "model_name" in message, (name, message)


def test_defaults_disable_repository_control_and_skip_escaping_entries(small_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(small_repo, repo)
    outside = tmp_path / "outside"
    shutil.copytree(small_repo / "tiny-vit", outside)
    (repo / "escape").symlink_to(outside, target_is_directory=True)
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        for call in (lambda: kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny-mt")),
                     lambda: kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny-mt"))):
            code, message = code_of(call)
            assert code == grpc.StatusCode.UNIMPLEMENTED and "--admin-token-file" in message
        assert kserve.ModelReady(pb.ModelReadyRequest(name="tiny-mt")).ready  # nothing was unloaded
        names = {m.name for m in kserve.RepositoryIndex(pb.RepositoryIndexRequest()).models}
        assert names == {"tiny-mt", "tiny-vit"}  # "escape" leads out of the repository: not an entry
        assert not kserve.ModelReady(pb.ModelReadyRequest(name="escape")).ready
    assert "escape leads out of the repository" in "".join(server.output)


def test_token_from_the_environment(small_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSERVE_AUTH_TOKEN", ",".join(USER_TOKENS))
    with running_server(small_repo) as server, grpc.insecure_channel(server.address) as channel:
        translator = tpb_grpc.TranslatorStub(channel)
        request = tpb.TranslateRequest(texts=["seven"])
        assert code_of(lambda: translator.Translate(request))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert translator.Translate(request, metadata=bearer(USER_TOKENS[1])).translations


def test_message_size_limit_at_the_byte(small_repo: Path) -> None:
    """--max-message-mb 1: a request of exactly 1 MiB is read (and answered on its merits), one byte more is
    refused with RESOURCE_EXHAUSTED before it is parsed; the server then answers the next request."""
    limit = 1 << 20

    def sized(size: int) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name="tiny-vit")
        request.id = "x" * (size - request.ByteSize() - 4)  # field tag + 3-byte length prefix
        assert request.ByteSize() == size
        return request

    with running_server(small_repo, "--max-message-mb", "1") as server:
        options = [("grpc.max_send_message_length", 4 * limit)]
        with grpc.insecure_channel(server.address, options=options) as channel:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            code, message = code_of(lambda: kserve.ModelInfer(sized(limit)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in message  # read; no tensors in it
            code, message = code_of(lambda: kserve.ModelInfer(sized(limit + 1)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(limit) in message
            assert kserve.ServerReady(pb.ServerReadyRequest()).ready


INJECTIONS = ["id\nFORGED ERROR line", "id\r\nFORGED", "\x1b[2J\x1b[31mFORGED", "id%0aFORGED", "ïd-FORGED",
              "FORGED " * 40]


def test_request_ids_cannot_inject_log_lines(small_repo: Path) -> None:
    """A client's x-request-id goes into every log line about its request — unless it could forge one: ids with
    line breaks, escape sequences, spaces or non-ASCII are replaced by a drawn id (gRPC itself refuses some
    of them before they leave the client). Whatever got through, no log line holds the injected text."""
    sent = 0
    with (running_server(small_repo, "--access-log", "--log-level", "debug") as server,
          grpc.insecure_channel(server.address) as channel):
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        for injected in INJECTIONS:
            for call in (lambda m: kserve.ServerLive(pb.ServerLiveRequest(), metadata=m),
                         lambda m: kserve.ModelInfer(pb.ModelInferRequest(model_name="nope"), metadata=m)):
                try:
                    call((("x-request-id", injected),))
                    sent += 1
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.INTERNAL and "metadata" in (e.details() or "").lower():
                        continue  # the client library refused the header: nothing was sent
                    assert e.code() == grpc.StatusCode.NOT_FOUND, e
                    assert "FORGED" not in dict(e.trailing_metadata() or ()).get("x-request-id", "")
                    sent += 1
    assert sent > 0
    forged = [line for line in server.output if "FORGED" in line]
    assert forged == [], forged


def test_binds_loopback_unless_told_otherwise(small_repo: Path) -> None:
    """``transerve serve`` without --host listens on 127.0.0.1 only: this machine's other addresses refuse."""
    import socket
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "transerve", "serve", "--repo", str(small_repo), "--port", "0",
                                "--metrics-port", "-1", "--drain-delay", "0", "--no-http"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        line = next(line for line in process.stdout if " on " in line and "serving" in line.lower())
        address = line.split(" on ")[1].split()[0]
        assert address.startswith("127.0.0.1:"), line
        port = int(address.rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # no packet is sent: only routing
            probe.connect(("10.255.255.255", 1))
            external = probe.getsockname()[0]
        if external.startswith("127."):
            pytest.skip("this machine has no address besides loopback to try")
        with socket.socket() as outside, pytest.raises(OSError):
            outside.settimeout(2)
            outside.connect((external, port))
    finally:
        process.terminate()
        assert process.wait(30) == 0


def test_rest_takes_the_same_tokens(guarded: ServerProcess) -> None:
    """REST (server/edge/rest.py) applies the gRPC rules: user tokens for inference, admin for repository control,
    health without a token; the statuses are KServe's (401, 403) and no token reaches the log."""
    import http.client
    import json

    def post(path: str, token: str | None, body: bytes = b"{}") -> tuple[int, dict[str, str]]:
        connection = http.client.HTTPConnection("127.0.0.1", guarded.http_port, timeout=30)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        status, reply = response.status, json.loads(response.read() or b"{}")
        connection.close()
        return status, reply

    doc = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["seven"]}]}).encode()
    assert post("/v2/models/tiny-mt/infer", None, doc) == (401, {"error": "missing bearer token"})
    assert post("/v2/models/tiny-mt/infer", "wrong", doc) == (401, {"error": "invalid bearer token"})
    status, reply = post("/v2/models/tiny-mt/infer", USER_TOKENS[1], doc)
    assert status == 200 and reply["outputs"][0]["name"] == "translation"
    assert post("/v2/models/tiny-mt/infer", ADMIN_TOKEN, doc)[0] == 200
    assert post("/v2/repository/models/tiny-mt/load", USER_TOKENS[0]) == \
        (403, {"error": "repository control needs an admin token"})
    assert post("/v2/repository/models/tiny-mt/load", ADMIN_TOKEN) == (200, {})
    connection = http.client.HTTPConnection("127.0.0.1", guarded.http_port, timeout=30)
    connection.request("GET", "/v2/health/ready")
    assert connection.getresponse().status == 200  # probes carry no token
    connection.close()
