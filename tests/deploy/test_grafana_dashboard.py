"""deploy/grafana/strata-dashboard.json: every query names a metric that a running Strata really exports.

The app runs for real (the shared local Ray and Serve, the demo model); after one request, GET /metrics is scraped
and every metric named in a panel query or a template variable must be among the exported sample names.
"""
from __future__ import annotations

import json
import re

import httpx
import pytest

from cluster.config import ClusterConfig, ModelConfig
from tests.support.paths import DEPLOY
from tests.support.serve_app import deploy, metrics

DASHBOARD = json.loads((DEPLOY / "grafana" / "strata-dashboard.json").read_text())
pytestmark = pytest.mark.slow  # deploys the demo app once (module fixture)
CONFIG = ClusterConfig(app_name="grafana", models=[ModelConfig(model="demo", num_kv_blocks=256, max_num_seqs=8)])
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan"}


@pytest.fixture(scope="module")
def base_url(serve_url):
    yield from deploy(serve_url, CONFIG)


@pytest.fixture(scope="module")
def exported_metrics(base_url) -> set[str]:
    # One request, so that histograms, counters and per-replica engine gauges all have samples.
    response = httpx.post(f"{base_url}/v1/completions", timeout=120,
                          json={"model": "demo", "prompt": "Grafana", "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    return set(metrics(base_url))


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left once strings, label matchers, ranges, grouping
    clauses, function names and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    identifiers = re.findall(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)
    return {i for i in identifiers if i.lower() not in PROMQL_KEYWORDS}


def panels() -> list[dict]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query-type template variable."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in panels() for t in p["targets"]]
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: unexpected query {query!r}"
            out.append((f"variable ${var['name']}", match.group(1)))
    return out


def test_the_metric_name_parser():
    assert metric_names('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$m"}[$__rate_interval])))'
                        ) == {"a_bucket"}
    assert metric_names("sum(rate(x_total[5m])) / sum without (replica) (y)") == {"x_total", "y"}


def test_every_query_names_an_exported_metric(exported_metrics):
    assert any(name.startswith("strata_") for name in exported_metrics)
    for where, expr in queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        missing = names - exported_metrics
        assert not missing, f"{where}: {sorted(missing)} not exported by /metrics (query {expr!r})"


def test_the_dashboard_has_the_panels_operators_need():
    titles = " | ".join(p["title"] for p in panels()).lower()
    for topic in ("time to first token", "inter-token latency", "throughput", "queue depth", "replicas",
                  "kv-cache usage", "prefix-cache hit rate"):
        assert topic in titles, f"no panel about {topic}"
    ttft = next(p for p in panels() if "time to first token" in p["title"].lower())
    assert {t["legendFormat"].split()[-1] for t in ttft["targets"]} == {"p50", "p90", "p99"}


def test_panels_use_the_datasource_variable_and_do_not_overlap():
    names = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "model"} <= names
    cells = set()
    for p in panels():
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
