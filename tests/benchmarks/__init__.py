"""The benchmark scripts a maintainer reruns, checked on CPU at toy sizes (their figures are not asserted)."""
