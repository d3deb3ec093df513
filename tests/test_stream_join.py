"""A streamed translation joins to the unary answer, on every path that streams — one test, parametrised.

The paths that differ: the task API's ``TranslateStream`` and KServe's ``ModelStreamInfer`` with ``stream: true``
(their own servicers and message shapes), the SDK's sync and asyncio ``translate_stream``, continuous batching
and request-level batching (``scheduler.mode: static``: greedy steps one sequence alone, beam search decodes with
the batch and streams its result whole), greedy and beam search, and the Ray deployment behind Ray's proxy.
(REST has no streaming endpoint.) Each streamed text must equal the unary ``Translate`` answer of the same
server and, where the entry carries its PyTorch checkpoint, the reference decoder's (PyTorch eager, one source
alone); messages that carry them must say ``done``/final only last, with token counts that never go down.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from helpers import ServerProcess, offline_text, running_server
from transerve_client import AsyncTranserveClient, TranserveClient
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc
from transerve_client.codec import encode_bytes

LONG_TEXT = "three hundred and forty-two"  # the long-mt entry never stops early: every stream is its budget long
BUDGET = 40


@dataclass
class Streamed:
    """What one streamed call delivered: the text pieces, and per message its token count and final flag."""

    pieces: list[str]
    tokens: list[int] = field(default_factory=list)
    final: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    address: str
    model: str
    text: str
    budget: int | None  # None: the model's own (the SDK sends no options)
    repo: Path | None  # a repository whose entry has its PyTorch checkpoint: the reference decoder applies


def options(target: Target, beam: int) -> tpb.TranslateOptions:
    return tpb.TranslateOptions(max_new_tokens=target.budget or 0, beam_size=beam)


def task_api(target: Target, beam: int) -> Streamed:
    with grpc.insecure_channel(target.address) as channel:
        messages = list(tpb_grpc.TranslatorStub(channel).TranslateStream(tpb.TranslateStreamRequest(
            model=target.model, text=target.text, options=options(target, beam)), timeout=120))
    return Streamed([m.piece for m in messages], [m.tokens for m in messages], [m.done for m in messages])


def kserve_stream(target: Target, beam: int) -> Streamed:
    request = pb.ModelInferRequest(model_name=target.model, id="join")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes([target.text]))
    request.parameters["stream"].bool_param = True
    if target.budget:
        request.parameters["max_new_tokens"].int64_param = target.budget
    request.parameters["beam_size"].int64_param = beam
    with grpc.insecure_channel(target.address) as channel:
        replies = [r.infer_response for r in pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([request]), timeout=120)]
    pieces = [r.raw_output_contents[0][4:].decode() if r.raw_output_contents else "" for r in replies]
    return Streamed(pieces, [int(r.parameters["tokens"].int64_param) for r in replies],
                    [r.parameters["triton_final_response"].bool_param for r in replies])


def sdk(target: Target, beam: int) -> Streamed:
    with TranserveClient(target.address, timeout=120) as client:
        return Streamed(list(client.translate_stream(target.text, model=target.model)))


def sdk_async(target: Target, beam: int) -> Streamed:
    async def pieces() -> list[str]:
        async with AsyncTranserveClient(target.address, timeout=120) as client:
            return [piece async for piece in client.translate_stream(target.text, model=target.model)]

    return Streamed(asyncio.run(asyncio.wait_for(pieces(), 120)))


PATHS = {"TranslateStream": task_api, "ModelStreamInfer": kserve_stream, "sdk": sdk, "sdk-async": sdk_async}
SDK_PATHS = {"sdk", "sdk-async"}  # no decoding options: the model's own beam and budget
CASES = [(server, path, beam) for server in ("continuous", "static") for path in PATHS
         for beam in ((1,) if path in SDK_PATHS else (1, 3))]
CASES += [pytest.param("ray", path, 1, marks=pytest.mark.slow) for path in ("TranslateStream", "ModelStreamInfer")]


@pytest.fixture(scope="module")
def continuous(long_repo: Path) -> Iterator[ServerProcess]:
    with running_server(long_repo) as server:
        yield server


@pytest.fixture(scope="module")
def static(long_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("static-repo")
    shutil.copytree(long_repo / "long-mt", repo / "long-mt")
    config = yaml.safe_load((repo / "long-mt" / "config.yaml").read_text())
    config["scheduler"]["mode"] = "static"
    (repo / "long-mt" / "config.yaml").write_text(yaml.safe_dump(config))
    with running_server(repo) as server:
        yield server


def target_for(kind: str, request: pytest.FixtureRequest, long_repo: Path) -> Target:
    if kind == "ray":  # the zoo's translator behind Ray's proxy (its entries carry no PyTorch checkpoint)
        return Target(request.getfixturevalue("ray_address"), "mt-en-de-numbers", "four thousand and two", None, None)
    server: ServerProcess = request.getfixturevalue(kind)
    return Target(server.address, "long-mt", LONG_TEXT, BUDGET, long_repo)


def model_defaults(target: Target) -> tuple[int, int]:
    """The entry's own budget and beam (config.yaml), which a request without options decodes with."""
    assert target.repo is not None
    config = yaml.safe_load((target.repo / target.model / "config.yaml").read_text())
    return int(config["max_new_tokens"]), int(config.get("beam_size") or 1)


def unary(target: Target, beam: int, sdk_path: bool) -> str:
    with grpc.insecure_channel(target.address) as channel:
        opts = tpb.TranslateOptions() if sdk_path else options(target, beam)
        reply = tpb_grpc.TranslatorStub(channel).Translate(
            tpb.TranslateRequest(model=target.model, texts=[target.text], options=opts), timeout=120)
    return str(reply.translations[0].text)


@pytest.mark.parametrize(("kind", "path", "beam"), CASES)
def test_stream_pieces_join_to_the_unary_answer(kind: str, path: str, beam: int, request: pytest.FixtureRequest,
                                                long_repo: Path) -> None:
    target = target_for(kind, request, long_repo)
    streamed = PATHS[path](target, beam)
    joined = "".join(streamed.pieces)
    assert joined == unary(target, beam, path in SDK_PATHS)
    if target.repo is not None:  # the reference decoder, with the settings the server decoded with
        budget, beam_used = model_defaults(target) if path in SDK_PATHS else (BUDGET, beam)
        assert joined == offline_text(target.repo, target.model, target.text, budget, beam_used)
    if streamed.final:
        assert streamed.final[-1] and not any(streamed.final[:-1])  # done only last
        assert streamed.tokens == sorted(streamed.tokens)  # counts never go down
    if kind != "ray" and path not in SDK_PATHS and beam == 1:
        assert len([p for p in streamed.pieces if p]) > 5  # greedy streams piece by piece, not at the end
        assert streamed.tokens[-1] == BUDGET  # the last message counts every token made
