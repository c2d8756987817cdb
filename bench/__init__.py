"""The project's benchmarks (scripts, plus the `bench.compare_init` package run with `python -m`) and `_common`, what
they share: the LoRA model they build, the gap closed, and the atomic result writers."""
