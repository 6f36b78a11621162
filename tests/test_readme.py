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
