"""One replica's engine, without Serve: tiny random checkpoints (tests/support/checkpoints.py) on CPU, and Ray
only where tensor/pipeline-parallel workers need it."""
