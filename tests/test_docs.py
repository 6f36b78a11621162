"""The README and docs/ stay true: the generated configuration reference matches the models, and every file, link,
command, endpoint, error code, metric, option and benchmark result the docs name exists."""
from __future__ import annotations

import json
import re

import pytest

from tests.support.paths import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
TEXT = {page: page.read_text() for page in PAGES}
RESULTS = ROOT / "benchmarks" / "results"


def doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def test_configuration_reference_is_generated_from_the_models():
    from cluster.config_reference import DOC, render

    assert DOC.read_text() == render(), "docs/configuration.md is out of date: run `python -m cluster.config_reference`"


def test_configuration_reference_rows_carry_each_default():
    """Every key of every config model has a row, with its own default, and a key with a default is never
    'required' (the README once listed http, api_keys and limits as required)."""
    from pydantic_core import PydanticUndefined

    from cluster.config import ClusterConfig, HTTPConfig, LimitsConfig, ModelConfig
    from engine.config import EngineConfig

    rows = {}
    for line in doc("configuration.md").splitlines():
        if m := re.match(r"\| `(\w+)` \| (.*?) \| (.*?) \| (.*) \|$", line):
            rows.setdefault(m[1], []).append(m[3])
    for model in (ClusterConfig, ModelConfig, EngineConfig, HTTPConfig, LimitsConfig):
        for name, field in model.model_fields.items():
            assert name in rows, f"docs/configuration.md lacks {model.__name__}.{name}"
            for default in rows[name]:
                if field.default is PydanticUndefined and field.default_factory is None:
                    assert default == "**required**", name
                    continue
                assert "required" not in default, f"{name} has a default but is listed as {default}"
                if field.default_factory is None:  # shown as JSON, the way a YAML file or flag spells it
                    assert default.startswith(f"`{json.dumps(field.default)}`"), f"{name}: {default}"


def test_readme_is_short_and_its_two_commands_exist():
    readme, makefile = TEXT[README], (ROOT / "Makefile").read_text()
    assert len(readme.splitlines()) <= 150
    for target in ("serve", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def named_paths(text: str) -> set[str]:
    """Repository paths a page names (`engine/core.py`, `deploy/ray-up/`, `benchmarks/results/x-*.json`)."""
    found = re.findall(r"(?:(?<=\.\./)|(?<![\w/.~-]))((?:benchmarks|cluster|deploy|docs|engine|helm|tests)/[\w./*-]*)",
                       text)
    return {p.rstrip(".") for p in found}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_a_page_names_exist(page):
    for path in sorted(named_paths(TEXT[page])):
        matches = list(ROOT.glob(path)) if "*" in path else [ROOT / path] if (ROOT / path).exists() else []
        assert matches, f"{page.relative_to(ROOT)} names {path}, which does not exist"


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", TEXT[page]):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(resolved.read_text()), f"{page.relative_to(ROOT)}: no heading for {target}"


def test_every_results_file_is_cited_and_every_cited_one_exists():
    cited = {p.removeprefix("benchmarks/results/") for text in TEXT.values() for p in named_paths(text)
             if re.fullmatch(r"benchmarks/results/[\w.-]+\.\w+", p)}
    kept = {p.name for p in RESULTS.iterdir()}
    assert cited, "the docs cite no results at all"
    assert not cited - kept, f"cited but missing: {sorted(cited - kept)}"
    assert not kept - cited, f"results no page cites (git history keeps old runs): {sorted(kept - cited)}"


def test_every_maintained_benchmark_is_documented():
    page = doc("benchmarks.md")
    scripts = [p for p in sorted((ROOT / "benchmarks").iterdir()) if p.suffix in (".py", ".sh")
               and p.name != "__init__.py"]
    assert len(scripts) > 10
    for script in scripts:
        assert f"`benchmarks/{script.name}`" in page, f"docs/benchmarks.md does not say how to run {script.name}"
    listing = (ROOT / "benchmarks" / "experiments" / "README.md").read_text()
    for script in sorted((ROOT / "benchmarks" / "experiments").glob("*.*")):
        if script.suffix in (".py", ".sh"):
            assert f"`{script.name}`" in listing, f"benchmarks/experiments/README.md does not list {script.name}"


def test_every_metric_is_documented_and_every_documented_one_exported():
    from cluster.metrics import EngineStatsCollector, ServingMetrics

    metrics = ServingMetrics()
    stats = {key: 0 for key, _ in [*EngineStatsCollector.GAUGES.values(), *EngineStatsCollector.COUNTERS.values()]}
    metrics.engines.update("m", [{**stats, "replica": "r"}])
    types = re.findall(r"^# TYPE (\S+) (\S+)$", metrics.render()[0].decode(), flags=re.M)
    exported = {name + "_total" if kind == "counter" and not name.endswith("_total") else name
                for name, kind in types}
    documented = {name for text in TEXT.values() for name in re.findall(r"`(strata_[a-z0-9_]+)", text)}
    assert len(exported) > 15
    assert not documented - exported, f"documented but not exported: {sorted(documented - exported)}"
    assert not exported - documented, f"exported but not documented: {sorted(exported - documented)}"


def test_every_endpoint_and_error_code_is_documented():
    page = doc("http-api.md")
    ingress = (ROOT / "cluster" / "ingress.py").read_text()
    routes = re.findall(r'@app\.(get|post)\("([^"]+)"\)', ingress)
    assert len(routes) >= 5
    for method, path in routes:
        assert f"`{method.upper()} {path}`" in page, f"docs/http-api.md lacks {method.upper()} {path}"
    sources = [*(ROOT / "cluster").glob("*.py"), *(ROOT / "engine").rglob("*.py")]
    raised = {c for p in sources for c in re.findall(r'\bcode\s*=\s*"([a-z_]+)"', p.read_text())}
    errors = page.split("## Errors", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| \d{3} \| [^|]+\| `([a-z_]+)` \|", errors, flags=re.M)) - {"null"}
    assert len(raised) >= 5
    assert not raised - listed, f"error codes the API sends but docs/http-api.md lacks: {sorted(raised - listed)}"
    assert not listed - raised, f"error codes docs/http-api.md lists but nothing sends: {sorted(listed - raised)}"


def test_offline_page_covers_sampling_params_and_llm():
    from dataclasses import fields

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    page = doc("offline-inference.md")
    for f in fields(SamplingParams):
        assert f"| `{f.name}` |" in page, f"docs/offline-inference.md lacks SamplingParams.{f.name}"
    for name in vars(LLM):
        if not name.startswith("_"):
            assert f"`{name}(" in page, f"docs/offline-inference.md lacks LLM.{name}"
