"""Benchmark scripts; run them from the repository root as modules: ``python -m bench.edit_latency``."""
