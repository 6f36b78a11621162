"""The `strata` command, run as users run it: a fresh process, from the repository root."""
from __future__ import annotations

import subprocess
import sys

from tests.support.paths import ROOT


def strata(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
