"""The Triton kernels against their torch references: interpreted on CPU, compiled with TRITON_INTERPRET=0 on a
GPU (see conftest.py)."""
