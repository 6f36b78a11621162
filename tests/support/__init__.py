"""What several test directories share, imported as `tests.support.<module>`:

- checkpoints: tiny random checkpoints of each architecture, and the demo with one poisoned token
- cli: the `strata` command run as users run it
- http_clients: requests to the OpenAI API that record how each ended, long streams, steady load
- paths: the repository's folders
- polling: wait until a condition holds
- ports: a free TCP port
- prompts: the prompts, messages and random token ids the tests send
- ray_cluster: Ray and Serve on this machine (one shared local Serve, a Ray of a module's own, multi-node clusters)
- ray_processes: the worker processes of this test's Ray
- serve_app: deploy a Strata app and read what it reports

The fixtures built on them live in tests/conftest.py (shared) and tests/engine/conftest.py (engine only).
"""
