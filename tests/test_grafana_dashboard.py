"""deploy/grafana/transerve-dashboard.json: every metric it queries is one a running server exports (scraped
after classification, translation and a streamed translation), and its JSON has the shape Grafana's
dashboard schema version 39 (the one it declares) requires of a dashboard and of its panels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import ServerProcess, metrics_text
from prometheus_client.parser import text_string_to_metric_families
from transerve_client import TranserveClient, TranserveError

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "transerve-dashboard.json"
METRIC = re.compile(r"\btranserve_[a-z_]+\b")


def dashboard() -> dict:  # type: ignore[type-arg]
    return json.loads(DASHBOARD.read_text())


def test_dashboard_has_grafana_schema_39_shape() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] == 39 and isinstance(doc["version"], int)
    assert {"title", "uid", "panels", "templating", "time"} <= set(doc) and re.fullmatch(r"[a-z0-9-]{1,40}", doc["uid"])
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in doc["panels"]:
        grid = panel["gridPos"]
        assert panel["type"] == "timeseries" and panel["title"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0 and grid["y"] >= 0, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] for t in panel["targets"])
        for target in panel["targets"]:  # each variable a query uses is defined
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= {*variables, "__rate_interval"}, target["expr"]


def test_every_queried_metric_is_exported(server: ServerProcess) -> None:
    with TranserveClient(server.address, timeout=60) as client:
        client.translate(["seven", "forty-two"])
        "".join(client.translate_stream("three hundred"))  # the streamed path: time to first token
        client.classify([np.zeros((3, 8, 8), np.float32)])
        with pytest.raises(TranserveError):
            client.translate(["   "])  # an error (empty text): a non-OK status row
    scraped = metrics_text(server)
    exported = {sample.name for family in text_string_to_metric_families(scraped) for sample in family.samples}
    queried = {name for panel in dashboard()["panels"] for target in panel["targets"]
               for name in METRIC.findall(target["expr"])}
    queried |= set(METRIC.findall(json.dumps(dashboard()["templating"])))
    assert queried, "the dashboard queries no transerve metric"
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
