"""Microbenchmarks (pytest-benchmark); not part of the default test run.

Run them with ``python -m pytest benchmarks -q --benchmark-only`` (see BENCHMARKS.md). This file
makes the folder a package, so its ``test_*.py`` modules do not clash with ``tests/`` modules of
the same name and spawned workers import :mod:`benchmarks.bench_workers` by its full name.
"""
