"""The README stays true: its two commands exist in the Makefile, and every engine option is documented."""
from pathlib import Path

from engine.config import EngineConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_set_up_commands_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("serve", "test"):
        assert f"make {target}" in README
        assert f"\n{target}:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_engine_option_is_in_the_readme_table():
    for name, field in EngineConfig.model_fields.items():
        assert f"| `{name}` | `{field.default!r}` |" in README, f"README lacks the engine option {name}"


def test_every_cluster_option_is_in_the_readme():
    from cluster.config import ClusterConfig, HTTPConfig, LimitsConfig, ModelConfig

    for cls in (ClusterConfig, HTTPConfig, LimitsConfig, ModelConfig):
        for name in cls.model_fields:
            assert f"| `{name}` |" in README, f"README lacks the {cls.__name__} option {name}"


def test_readme_metric_names_are_exported():
    import re

    source = (ROOT / "cluster" / "metrics.py").read_text()
    names = set(re.findall(r"`(strata_[a-z0-9_]+)", README))
    assert len(names) > 10
    for name in names:
        base = name.removeprefix("strata_")  # metrics.py adds the prefix, and prometheus-client the counters' _total
        assert f'"{base}"' in source or f'"{base.removesuffix("_total")}"' in source, \
            f"README names {name}, which cluster/metrics.py lacks"


def test_files_the_readme_names_exist():
    import re

    for path in set(re.findall(r"`((?:deploy|helm|benchmarks)/[\w./-]+\.\w+)`", README)):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
