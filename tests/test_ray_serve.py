"""transerve on Ray Serve: the config file, and two replicas behind Ray's gRPC proxy answering like one server.

The slow tests run ``serve run deploy/ray/serve.yaml`` from the project root against the package installed from
wheels (the file's two ports moved to free ones; its 2 replicas), as a user would, and send 64 concurrent
requests (translations and classifications) with the generated stubs. Both replicas must answer (the
``x-transerve-replica`` trailing metadata names each one's process), and every answer must equal what a
single ``transerve serve`` process gives for the same request. Ray is in the ``ray`` extra, which ``dev``
includes; in CI a missing Ray fails the test rather than skipping it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import SERVE_YAML, png_bytes, running_server, wait_serving
from transerve_client._proto import inference_pb2 as ipb
from transerve_client._proto import inference_pb2_grpc as ipb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

if os.environ.get("CI") == "true":
    import ray.serve  # noqa: F401  (CI installs the dev extra, which brings Ray: fail here, never skip)
ray_serve = pytest.importorskip("transerve.server.edge.ray_serve", reason="Ray Serve is not installed "
                                "(pip install 'transerve[ray]')")


def config() -> dict[str, Any]:
    return yaml.safe_load(SERVE_YAML.read_text())


def test_config_file_is_a_valid_serve_config_for_this_module() -> None:
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    raw = config()
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.grpc_options.port == 9000
    assert schema.grpc_options.grpc_servicer_functions == ray_serve.SERVICER_FUNCTIONS
    assert len(gRPCOptions(**raw["grpc_options"]).grpc_servicer_func_callable) == 4  # each one imports
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert module == ray_serve.__name__ and getattr(ray_serve, attr) is ray_serve.app_builder
    (deployment,) = app.deployments
    defaults = ray_serve.TranserveReplica  # the decorator's options must agree with the file's
    assert deployment.name == defaults.name
    assert deployment.max_ongoing_requests == defaults.max_ongoing_requests
    assert deployment.max_queued_requests == defaults._deployment_config.max_queued_requests
    assert deployment.ray_actor_options.num_cpus == defaults.ray_actor_options["num_cpus"]
    assert deployment.graceful_shutdown_timeout_s == defaults._deployment_config.graceful_shutdown_timeout_s
    scaling = deployment.autoscaling_config
    assert deployment.num_replicas == "auto" and 2 <= scaling["min_replicas"] <= scaling["max_replicas"]


def test_every_rpc_of_the_proxied_services_has_a_deployment_method() -> None:
    """The proxy routes by method name and answers INTERNAL for a method the deployment lacks."""
    from grpc_health.v1 import health_pb2
    from transerve_client._proto import inference_pb2, transerve_pb2

    replica = ray_serve.TranserveReplica.func_or_class
    services = [transerve_pb2.DESCRIPTOR.services_by_name["Translator"],
                transerve_pb2.DESCRIPTOR.services_by_name["Classifier"],
                inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                health_pb2.DESCRIPTOR.services_by_name["Health"]]
    missing = {m.name for s in services for m in s.methods if not callable(getattr(replica, m.name, None))}
    assert missing == {"Watch"}  # on purpose: see Check's comment in transerve.server.edge.ray_serve


def test_builder_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ray_serve.REPO_ENV, raising=False)
    with pytest.raises(ValueError, match="TRANSERVE_REPO: not set"):
        ray_serve.app_builder({})
    monkeypatch.setenv(ray_serve.REPO_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="is not a directory"):
        ray_serve.app_builder({})
    monkeypatch.setenv(ray_serve.REPO_ENV, str(tmp_path))
    assert ray_serve.app_builder({"threads": "2"}) is not None


def requests() -> list[tpb.TranslateRequest | tpb.ClassifyRequest]:
    """32 translations and 32 classifications (the held-out digits as PNG, as a user sends them), interleaved."""
    from num2words import num2words
    from transerve.models.zoo.digits import DigitsRecipe, split_digits

    _, _, images, _ = split_digits(DigitsRecipe())
    encoded = [png_bytes(image) for image in images[:32]]
    texts = [num2words(n) for n in range(3, 9000, 281)][:32]
    both: list[tpb.TranslateRequest | tpb.ClassifyRequest] = []
    for text, png in zip(texts, encoded, strict=True):
        both.append(tpb.TranslateRequest(texts=[text]))
        both.append(tpb.ClassifyRequest(model="vit-digits", images=[tpb.Image(encoded=png)], top_k=3))
    return both


async def send_all(address: str, batch: list[Any]) -> list[tuple[Any, str]]:
    """Every request at once; each answer with the replica that gave it (or '' from a plain server)."""
    async with grpc.aio.insecure_channel(address) as channel:
        translator, classifier = tpb_grpc.TranslatorStub(channel), tpb_grpc.ClassifierStub(channel)

        async def one(request: Any) -> tuple[Any, str]:
            method = translator.Translate if isinstance(request, tpb.TranslateRequest) else classifier.Classify
            call = method(request, timeout=120)
            response = await call
            replica = dict(await call.trailing_metadata() or ()).get(ray_serve.REPLICA_HEADER, "")
            return response, str(replica)

        return await asyncio.gather(*(one(r) for r in batch))


def same_answer(a: Any, b: Any) -> bool:
    if isinstance(a, tpb.TranslateResponse):
        return [t.text for t in a.translations] == [t.text for t in b.translations]
    got = [[(p.index, p.label) for p in c.predictions] for c in a.results]
    want = [[(p.index, p.label) for p in c.predictions] for c in b.results]
    scores = np.array([[p.score for p in c.predictions] for c in a.results])
    expected = np.array([[p.score for p in c.predictions] for c in b.results])
    return got == want and np.allclose(scores, expected, atol=1e-5)  # batch composition may move the last bits


@pytest.mark.slow
def test_two_replicas_answer_like_one_server(ray_address: str, zoo_repo: Path) -> None:
    batch = requests()
    assert len(batch) == 64
    with running_server(zoo_repo, "--precision", "fp32") as single:
        expected = asyncio.run(send_all(single.address, batch))
    wait_serving(ray_address)
    answers = asyncio.run(send_all(ray_address, batch))
    pids = {replica.rsplit(":", 1)[-1] for _, replica in answers}
    assert len(pids) == 2 and "" not in pids, pids  # both replicas served, in different processes
    assert os.getpid() not in {int(p) for p in pids}
    mismatched = [i for i, ((got, _), (want, _)) in enumerate(zip(answers, expected, strict=True))
                  if not same_answer(got, want)]
    assert not mismatched, mismatched


@pytest.mark.slow
def test_proxy_errors_streams_health_and_reflection(ray_address: str) -> None:
    wait_serving(ray_address)
    with grpc.insecure_channel(ray_address) as channel:
        translator = tpb_grpc.TranslatorStub(channel)
        # (streams through the proxy join to the unary answer: tests/test_stream_join.py)
        whole = tpb.TranslateOptions(segmentation=tpb.SEGMENTATION_WHOLE)  # one model input: the text limit applies
        for call, words in ((lambda: translator.Translate(tpb.TranslateRequest(texts=["x" * 5000], options=whole)),
                             "texts[0]: 5000 characters exceed the limit of 4096"),
                            (lambda: list(translator.TranslateStream(tpb.TranslateStreamRequest(text="x" * 5000,
                                                                                                options=whole))),
                             "text[0]: 5000 characters exceed the limit of 4096")):
            with pytest.raises(grpc.RpcError) as failed:
                call()
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert failed.value.details() == words  # our message, no Ray traceback
        with pytest.raises(grpc.RpcError) as unknown:
            translator.Translate(tpb.TranslateRequest(texts=["one"], model="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in (unknown.value.details() or "")

        kserve = ipb_grpc.GRPCInferenceServiceStub(channel)
        assert kserve.ServerLive(ipb.ServerLiveRequest()).live and kserve.ServerReady(ipb.ServerReadyRequest()).ready
        assert kserve.ModelReady(ipb.ModelReadyRequest(name="vit-digits")).ready
        assert kserve.ModelMetadata(ipb.ModelMetadataRequest(name="vit-digits")).inputs[0].name == "images"

        listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest()).statuses
        assert listed["transerve.v1.Translator"].status == listed["vit-digits"].status == \
            health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (listing,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in listing.list_services_response.service}
        assert {"transerve.v1.Translator", "transerve.v1.Classifier", "inference.GRPCInferenceService",
                "grpc.health.v1.Health"} <= names
