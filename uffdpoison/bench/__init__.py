"""Benchmarks: each module exposes ``run(...) -> dict`` and runs with ``python -m``."""
