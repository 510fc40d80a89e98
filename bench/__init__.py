"""Benchmarks of the worker: `python -m bench.throughput` and `python -m bench.long_audio`.

They are measurements, not tests: each prints a table and writes its raw numbers to bench/out/.
"""
