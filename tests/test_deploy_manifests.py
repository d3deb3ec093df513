"""deploy/k8s checked offline like code: schemas (strict), then what no schema checks; negative fixtures fail.

* Standard kinds: ``kubernetes-validate`` strict (its own schemas, no network); a kind it has no schema for
  is a failure, not a warning.
* KServe kinds: ``jsonschema`` against KServe's CRDs (``../shared/schemas/kserve/``), made strict by adding
  ``additionalProperties: false`` wherever a schema lists ``properties`` and does not preserve unknown fields.
* Ours: container name ``kserve-container``, protocols among KServe's grpc-v2 and v2 (REST), one protocol per
  runtime, an InferenceService's protocol one its runtime speaks, runtime and model format matching the
  ClusterServingRuntime, one port (h2c for grpc-v2, the REST --http-port for v2) and no Knative-reserved port, gRPC
  probes on the serving port, termination grace ≥ preStop + the server's drain delay and grace, PDB selector = pod
  labels, metrics port = the server's ``--metrics-port``.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "k8s").rglob("*.yaml"))
BAD = Path(__file__).parent / "data" / "bad_manifests"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kserve"
KSERVE = {"ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
          "ClusterServingRuntime": "serving.kserve.io_clusterservingruntimes.yaml",
          "InferenceService": "serving.kserve.io_inferenceservices.yaml"}
KNATIVE_RESERVED = {8012, 8013, 8022, 9090, 9091, 8008, 9088}
PROTOCOLS = {"grpc-v2", "v2"}  # what transerve answers (KServe also knows v1 and grpc-v1)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def strict(schema: Any) -> Any:
    """A copy with ``additionalProperties: false`` on every object schema that lists its properties."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


@cache
def kserve_validator(kind: str) -> Any:
    import jsonschema

    crd = yaml.safe_load((SCHEMAS / KSERVE[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return jsonschema.Draft202012Validator(strict(copy.deepcopy(version["schema"]["openAPIV3Schema"])))


def schema_errors(doc: dict[str, Any]) -> list[str]:
    if doc["kind"] in KSERVE:
        if not SCHEMAS.is_dir():
            pytest.skip(f"KServe CRD schemas not found at {SCHEMAS} (they live in the project's shared/ folder)")
        return [f"{doc['kind']}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in kserve_validator(doc["kind"]).iter_errors(doc)]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, "1.37", strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{doc['kind']}: no schema ({e})"]
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']}: {'/'.join(map(str, e.path))}: {e.message}"]
    return []


def flag(args: list[str], name: str, default: int) -> int:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return int(float(values[-1])) if values else default


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "Deployment":
        return dict(doc["spec"]["template"]["spec"])
    if doc["kind"] in ("ServingRuntime", "ClusterServingRuntime"):
        return dict(doc["spec"])
    return None


def container_problems(doc: dict[str, Any]) -> list[str]:
    spec = pod_spec(doc)
    if spec is None:
        return []
    problems = []
    for c in spec["containers"]:
        args = c.get("args", [])
        port = flag(args, "port", 8001)
        probe_ports = {port, flag(args, "health-port", port)}  # the serving port, or the plaintext health port
        if doc["kind"] != "Deployment" and c["name"] != "kserve-container":
            problems.append(f"{doc['kind']}: container {c['name']!r} must be named kserve-container")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc_probe = c.get(probe, {}).get("grpc")
            if grpc_probe is not None and grpc_probe.get("port") not in probe_ports:
                problems.append(f"{probe}: gRPC probe on port {grpc_probe.get('port')!r}, the server serves {port}")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if "metrics" in ports and ports["metrics"] != flag(args, "metrics-port", 8002):
            problems.append("the metrics port differs from the server's --metrics-port")
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        delay, grace = flag(args, "drain-delay", 5), flag(args, "grace", 30)
        if doc["kind"] == "Deployment" and spec.get("terminationGracePeriodSeconds", 30) < pre_stop + delay + grace + 5:
            problems.append(f"terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds', 30)} < "
                            f"preStop {pre_stop} + drain delay {delay} + drain grace {grace} + 5 s margin")
        if doc["kind"] != "Deployment":
            rest = spec.get("protocolVersions") == ["v2"]
            if (rest and list(ports.values()) != [flag(args, "http-port", 8000)]) or (rest and "h2c" in ports):
                problems.append(f"{doc['kind']}: v2 (REST) needs its one port at --http-port, not h2c: {ports}")
            if not rest and list(ports) != ["h2c"]:
                problems.append(f"{doc['kind']}: exactly one port named h2c, got {list(ports)}")
            if set(ports.values()) & KNATIVE_RESERVED:
                problems.append(f"{doc['kind']}: port {ports} is reserved by Knative")
    return problems


def kserve_problems(docs: list[dict[str, Any]], runtimes: dict[str, set[str]],
                    protocols_of: dict[str, set[str]]) -> list[str]:
    problems = []
    for doc in docs:
        if doc["kind"] in ("ServingRuntime", "ClusterServingRuntime"):
            protocols = doc["spec"].get("protocolVersions", [])
            wrong = set(protocols) - PROTOCOLS
            if wrong or len(protocols) != 1:
                problems.append(f"{doc['kind']}: protocolVersions {protocols} (transerve: one of grpc-v2, v2 per "
                                "runtime: each runtime has one port)")
        if doc["kind"] == "InferenceService":
            model = doc["spec"]["predictor"]["model"]
            speaks = protocols_of.get(model.get("runtime", ""), set())
            if model.get("protocolVersion") not in PROTOCOLS & speaks:
                problems.append(f"InferenceService: protocolVersion {model.get('protocolVersion')!r} must be set "
                                f"explicitly to what runtime {model.get('runtime')!r} speaks ({sorted(speaks)})")
            formats = runtimes.get(model.get("runtime", ""))
            if formats is None or model["modelFormat"]["name"] not in formats:
                problems.append(f"InferenceService: runtime {model.get('runtime')!r} does not serve format "
                                f"{model['modelFormat']['name']!r}")
    return problems


def selector_problems(docs: list[dict[str, Any]]) -> list[str]:
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"]
    return [f"{d['kind']}: selector {d['spec']['selector']} matches no pod labels" for d in docs
            if d["kind"] in ("PodDisruptionBudget", "Service")
            and not any(set((d["spec"]["selector"].get("matchLabels") or d["spec"]["selector"]).items())
                        <= set(labels.items()) for labels in pods)]


def all_problems(docs: list[dict[str, Any]], context: list[dict[str, Any]]) -> list[str]:
    """Every problem of ``docs``, checked against the whole set (``context``) for cross-references."""
    runtimes = {d["metadata"]["name"]: {f["name"] for f in d["spec"]["supportedModelFormats"]}
                for d in context if d["kind"] in ("ServingRuntime", "ClusterServingRuntime")}
    problems = [p for d in docs for p in schema_errors(d)]
    problems += [p for d in docs for p in container_problems(d)]
    protocols_of = {d["metadata"]["name"]: set(d["spec"].get("protocolVersions", []))
                    for d in context if d["kind"] in ("ServingRuntime", "ClusterServingRuntime")}
    problems += kserve_problems(docs, runtimes, protocols_of) + selector_problems(docs if len(docs) > 1 else context)
    return problems


SHIPPED = [d for path in MANIFESTS for d in documents(path)]


def test_every_shipped_manifest_passes() -> None:
    assert {d["kind"] for d in SHIPPED} >= {"ClusterServingRuntime", "InferenceService", "Deployment", "Service",
                                            "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert all_problems(SHIPPED, SHIPPED) == []
    modes = {d["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] for d in SHIPPED
             if d["kind"] == "InferenceService"}
    assert modes == {"Standard", "Knative"}


@pytest.mark.parametrize("fixture", sorted(p.name for p in BAD.glob("*.yaml")))
def test_negative_fixtures_fail(fixture: str) -> None:
    docs = documents(BAD / fixture)
    problems = all_problems(docs, [*docs, *SHIPPED])
    assert problems, f"{fixture} passed every check"


def test_strict_schema_catches_what_the_plain_crd_accepts() -> None:
    """The reason for strict(): KServe's CRD alone accepts the misspelt field."""
    import jsonschema

    if not SCHEMAS.is_dir():
        pytest.skip(f"KServe CRD schemas not found at {SCHEMAS}")
    doc = documents(BAD / "typo-protocol-versions.yaml")[0]
    crd = yaml.safe_load((SCHEMAS / KSERVE[doc["kind"]]).read_text())
    plain = next(v for v in crd["spec"]["versions"] if v.get("storage"))["schema"]["openAPIV3Schema"]
    assert not list(jsonschema.Draft202012Validator(plain).iter_errors(doc))
    assert any("protocolVersion" in e.message for e in kserve_validator(doc["kind"]).iter_errors(doc))
