"""`RankSweepCallback`: lm-eval benchmarks of every rank during and after training, logged like any metric.

Example:

```python
from hf_quailora import RankSweepCallback

trainer.add_callback(RankSweepCallback(trainer, ranks=[1, 4, 16], tasks="quailora_wiki_ppl", limit=20))
```
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from .._peft_utils import unwrap_model
from ..dynamic_rank.spec import parse_ranks
from ..dynamic_rank.truncation import TrainedRanks


class RankSweepCallback(TrainerCallback):
    """Benchmark every rank with lm-eval at the end of training (and every N evaluations), logged like any metric.

    The per-rank metrics go through `trainer.log`, so they reach TensorBoard / W&B / `log_history` with
    `report_to`, as `rank_sweep/{task}/{metric}@r{b}`; the main process also writes `results.json`, `results.md` and
    `results.png` into `output_dir/rank_sweep`.

    Args:
        trainer (`transformers.Trainer`): the trainer whose model is evaluated (trl's `LogCompletionsCallback` pattern).
        ranks (`list[int]` or `str`): ranks to evaluate, e.g. `[1, 2, 4, 8]`; checked against the trainer's ranks
            (its `max_rank`, else the LoRA r) when the callback is made.
        tasks (`list[str]` or `str`, defaults to `"quailora_wiki_ppl"`): lm-eval tasks (see `evaluate_ranks`).
        every_n_evals (`int`, *optional*): also sweep after every n-th `evaluate()`; `None`: only at train end.
        rank_scaling (`str`, *optional*): defaults to the scaling the model's adapter was trained with (see
            `use_rank`).
        **evaluate_kwargs: passed to `evaluate_ranks` (`limit`, `batch_size`, `max_length`, `num_fewshot`, …).

    Example:

    ```python
    trainer = DynamicRankTrainer(...)
    trainer.add_callback(RankSweepCallback(trainer, ranks=[1, 4, 16], tasks="quailora_wiki_ppl", limit=20))
    ```
    """

    def __init__(self, trainer, ranks, tasks="quailora_wiki_ppl", every_n_evals: int | None = None,
                 rank_scaling: str | None = None, **evaluate_kwargs):
        # Hyperparameters, checked now rather than after training
        from .lm_eval_bridge import check_lm_eval_options, resolve_tasks

        if every_n_evals is not None and (not isinstance(every_n_evals, int) or every_n_evals < 1):
            raise ValueError(f"`every_n_evals` ({every_n_evals}) must be a positive integer or None.")
        self.trainer = trainer
        self.ranks = parse_ranks(ranks)
        TrainedRanks.from_model(unwrap_model(trainer.model)).check(self.ranks, "ranks")
        options = ("limit", "batch_size", "max_length", "num_fewshot")
        check_lm_eval_options(**{key: evaluate_kwargs[key] for key in options if key in evaluate_kwargs})
        self.tasks, _ = resolve_tasks(tasks, evaluate_kwargs.get("include_path"))
        self.every_n_evals = every_n_evals
        self.rank_scaling = rank_scaling
        self.evaluate_kwargs = evaluate_kwargs
        # Internal state
        self._evaluations = 0
        self.history: list[dict] = []

    def _sweep(self, args, state) -> None:
        from .lm_eval_bridge import evaluate_ranks

        model = unwrap_model(self.trainer.model)
        tokenizer = getattr(self.trainer.processing_class, "tokenizer", self.trainer.processing_class)
        output_dir = os.path.join(args.output_dir, "rank_sweep") if state.is_world_process_zero else None
        rows = evaluate_ranks(model, tokenizer, self.ranks, self.tasks, rank_scaling=self.rank_scaling,
                              output_dir=output_dir, overwrite=True, show_progress=state.is_world_process_zero,
                              **self.evaluate_kwargs)
        self.history.append({"step": state.global_step, "rows": rows})
        self.trainer.log({f"rank_sweep/{row['task']}/{row['metric']}@r{row['rank']}": row["value"] for row in rows})

    def on_evaluate(self, args, state, control, **kwargs):
        self._evaluations += 1
        if self.every_n_evals and self._evaluations % self.every_n_evals == 0:
            self._sweep(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._sweep(args, state)
