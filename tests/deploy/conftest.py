"""tests/deploy: the deployment artifacts under deploy/ and helm/ are checked by the tools that consume them
(Ray's cluster-config validation, Helm's own Go library, KubeRay's CRD schemas, HAProxy, a running Strata).

Two modules start Ray (test_grafana_dashboard: one local node; test_load_balancer: a two-node cluster), each
once, shutting down whatever Ray an earlier test package left running; the rest need no Ray.
"""
import sys
from pathlib import Path

# The cluster tests' helpers (free_port, deploy, metrics, wait_for) are shared, not copied.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
