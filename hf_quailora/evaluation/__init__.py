"""Proof: per-rank evaluation with lm-evaluation-harness, held-out perplexity, reports and plots.

| module | holds |
|---|---|
| `lm_eval_bridge` | `evaluate_ranks`, the lm-eval model `hf-dynrank` (imports lm-eval; importing it registers the model) |
| `lm_eval_cli` | `hf-quailora lm-eval`: lm-eval's own command line with `hf-dynrank` registered and the offline tasks |
| `tasks/` | the offline task YAML files and `write_offline_tasks` |
| `perplexity` | `compute_perplexity` on token windows |
| `reporting` | result rows → JSON, Markdown, a PNG of each metric against rank |
| `sweep_callback` | `RankSweepCallback`: the lm-eval sweep during and after training |

This package's `__init__` imports nothing heavy: lm-eval loads only with `lm_eval_bridge`.
"""
