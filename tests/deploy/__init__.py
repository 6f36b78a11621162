"""The deployment artifacts under deploy/ and helm/, checked by the tools that consume them (Ray's cluster-config
validation, Helm's own Go library, KubeRay's CRD schemas, HAProxy, a running Strata).

test_grafana_dashboard deploys on the shared local Serve (tests/conftest.py's `serve_url`); test_load_balancer
starts a two-node cluster of its own; the rest need no Ray.
"""
