"""Benchmark scripts for Ocula on a GPU (and, with `--tiny`, end to end on a CPU).

Run them from the repository root as modules, e.g. `python -m benchmarks.run_all`; see
`benchmarks/README.md`. Nothing here is imported by `ocula` or by the test suite.
"""
