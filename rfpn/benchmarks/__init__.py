"""Benchmarks as library code: the ``tools/benchmark_*.py`` scripts parse arguments and call these.

Importing this package registers nothing; each module is imported by its tool (and its tests).
"""
