"""Benchmarks against peers (run from a checkout: `python -m bench.gateway`; not installed)."""
