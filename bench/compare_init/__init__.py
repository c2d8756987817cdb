"""Fine-tuning comparison of LoRA starts on a quantized base; run `python -m bench.compare_init --help` from the
repository root (see `bench/compare_init/__main__.py`)."""
