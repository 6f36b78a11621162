"""The `strata` command, run as users run it: a fresh process, from the repository root."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.support.paths import ROOT


def strata(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`env`: variables added to this process's environment."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
