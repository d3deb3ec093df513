"""The served precision, end to end: `precision: auto` on the trained zoo, and `serve --precision`.

What must hold: ModelMetadata and ModelStatistics say which runtime and precision serve each model and why;
under ``auto`` the served answers keep the zoo's accuracy within the gate (classifier test accuracy and
translation exact match at most 0.5 % below fp32's); an explicit precision that an entry cannot serve
leaves that entry unavailable with the reason, and the others serving.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from helpers import png_bytes, running_server
from transerve.export.accuracy_gate import ACCURACY_DROP
from transerve.models.zoo.digits import DigitsRecipe, split_digits
from transerve.server.backends.precision import choose, read_variants
from transerve_client._proto import inference_pb2 as pb
from transerve_client._proto import inference_pb2_grpc as pb_grpc
from transerve_client._proto import transerve_pb2 as tpb
from transerve_client._proto import transerve_pb2_grpc as tpb_grpc

pytestmark = pytest.mark.slow


def serving(channel: grpc.Channel, model: str) -> dict[str, str]:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
    assert {k: v.string_param for k, v in stats.parameters.items()} == \
        {k: metadata.parameters[k].string_param for k in ("runtime", "precision")}
    return {"platform": metadata.platform, **{k: v.string_param for k, v in metadata.parameters.items()}}


def digits_accuracy(channel: grpc.Channel) -> float:
    _, _, images, labels = split_digits(DigitsRecipe())
    stub, predictions = tpb_grpc.ClassifierStub(channel), []
    for start in range(0, len(images), 64):
        batch = [tpb.Image(encoded=png_bytes(image)) for image in images[start:start + 64]]
        response = stub.Classify(tpb.ClassifyRequest(model="vit-digits", images=batch, top_k=1))
        predictions += [int(r.predictions[0].label) for r in response.results]
    return float(np.mean(np.array(predictions) == labels))


def test_auto_reports_its_choice_and_keeps_the_zoo_accuracy(zoo_repo: Path, zoo_dir: Path) -> None:
    with running_server(zoo_repo) as server, grpc.insecure_channel(server.address) as channel:
        for name in ("vit-digits", "mt-en-de-numbers"):
            entry = zoo_repo / name
            files = yaml.safe_load((entry / "config.yaml").read_text())["files"]
            expected = choose("auto", files, read_variants(entry / "1"))
            got = serving(channel, name)
            assert (got["precision"], got["runtime"]) == (expected.precision, expected.runtime), got
            assert got["precision_reason"] == expected.reason and got["precision_reason"].startswith("auto")
            assert got["platform"] == {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}[got["runtime"]]
        zoo = json.loads((zoo_dir / "zoo_report.json").read_text())["models"]["vit-digits"]["test_accuracy"]
        assert digits_accuracy(channel) >= zoo - ACCURACY_DROP
    assert "precision" in "".join(server.output)  # the choice is logged, with its reason


def test_explicit_precision_serves_that_variant_or_says_why(zoo_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("vit-digits", "vit-digits-bn"):
        shutil.copytree(zoo_repo / name, repo / name)
    report = repo / "vit-digits-bn" / "1" / "export_report.json"
    data = json.loads(report.read_text())
    data["variants"]["int8"]["gate"].update(passed=False, why="logit MAE 0.5 > 0.01")  # as if it had failed
    report.write_text(json.dumps(data))
    with running_server(repo, "--precision", "int8") as server, grpc.insecure_channel(server.address) as channel:
        got = serving(channel, "vit-digits")
        assert (got["precision"], got["runtime"]) == ("int8", "onnxruntime")
        assert got["precision_reason"].startswith("int8 asked for (gate passed: logit MAE"), got
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="vit-digits-bn"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "failed its accuracy gate at export (logit MAE 0.5 > 0.01)" in refused.value.details()
