"""Microbenchmarks and end-to-end benchmarks; run with `python -m bench.<module>` from the repository root."""
