"""The kernels run in Triton's CPU interpreter here (TRITON_INTERPRET=0 on a GPU machine runs them on CUDA).

Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, i.e. when its module is imported, so
the variable is set before this directory imports Triton or engine.kernels. A missing Triton fails the run (it is a
test dependency): no skip. The variable is removed again after the imports and set per test by a fixture, so test
directories collected after this one don't see it.
"""
import os
import sys

_previous = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"


def _built_for_interpreter() -> bool:
    return type(sys.modules["triton.language"].sum).__name__ == "InterpretedFunction"


if INTERPRET and "triton.language" in sys.modules and not _built_for_interpreter():
    # torch (through transformers, from a parent conftest) imported Triton before this file ran, so Triton's own
    # jit library (tl.sum, tl.max, tl.cdiv, ...) was built for the GPU and fails inside the interpreter. Import its
    # Python modules afresh; the compiled core triton._C cannot be loaded twice and holds nothing to redo.
    for _name in [n for n in sys.modules if n.split(".")[0] == "triton" and not n.startswith("triton._C")]:
        del sys.modules[_name]
for _name in [n for n in sys.modules if n == "engine.kernels" or n.startswith("engine.kernels.")]:
    del sys.modules[_name]  # decorated earlier, possibly without the interpreter

import pytest  # noqa: E402
import triton  # noqa: E402,F401

import engine.kernels  # noqa: E402,F401  (decorates every kernel now, while the variable is set)
from tests.support.triton_interpreter import skip_repeated_patching  # noqa: E402

assert not INTERPRET or _built_for_interpreter()
if INTERPRET:
    skip_repeated_patching()
if _previous is None:
    del os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cpu" if INTERPRET else "cuda"
