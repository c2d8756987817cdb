"""The project's benchmarks (scripts, plus the `bench.compare_init` package run with `python -m`)."""
