"""Reliability: faults, overload and bad input against real Ray Serve, real HTTP and the demo model.

The single-node modules share the local Serve of tests/conftest.py's `serve_url`, each deploying its own app;
the node-loss module needs a multi-node `ray.cluster_utils.Cluster` and shuts the shared one down first.
"""
