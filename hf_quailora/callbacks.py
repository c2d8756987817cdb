"""Trainer callbacks: QuAILoRA initialisation at the start of training.

Example:

```python
from trl import SFTConfig, SFTTrainer
from hf_quailora import QuAILoRAInitCallback

callback = QuAILoRAInitCallback(calibration_dataset=c4_texts, num_samples=64, max_length=256)
trainer = SFTTrainer(model=peft_model, args=SFTConfig(...), train_dataset=data, callbacks=[callback])
trainer.train()  # LoRA factors are set by QuAILoRA before the first step
print(callback.report.summary())
```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch
from transformers import TrainerCallback

from .quailora import QuAILoRAConfig, QuAILoRAReport, find_lora_layers, quailora_init


logger = logging.getLogger(__name__)


def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / DataParallel
        model = model.module
    return model


class QuAILoRAInitCallback(TrainerCallback):
    """Run `quailora_init` on the trainer's model at `on_train_begin`, before the first optimizer step.

    Factors are written in place (`param.data.copy_()`), so the optimizer keeps its Parameters. Under several
    processes each process calibrates on its shard, the Gram matrices are all-reduced, and rank 0's factors are
    broadcast, so every process ends with identical weights. When training resumes from a checkpoint
    (`global_step > 0`) the callback does nothing: the checkpoint's weights are kept.

    Args:
        calibration_dataset (*optional*): texts, token ids, a `datasets.Dataset` with `"text"`/`"input_ids"`, or
            batches. `None` takes batches from the trainer's train dataloader.
        num_samples (`int`, defaults to 128): calibration sequences (over all processes).
        max_length (`int`, defaults to 512): tokens per calibration text.
        solver (`str`, defaults to `"closed_form"`): `"closed_form"`, `"als"` or `"svd"`.
        config (`QuAILoRAConfig`, *optional*): full settings; overrides the four above when given.
        full_precision_weights (*optional*): checkpoint folder, Hub id or state dict with the unquantized `W`;
            defaults to where the model was loaded from.
        tokenizer (*optional*): for text calibration; defaults to the trainer's processing class.
        adapter_name (`str`, defaults to `"default"`).
        report_file (`str`, *optional*, defaults to `"quailora_report.json"`): written into `output_dir` by the main
            process (`None`: not written).

    Attributes:
        report (`QuAILoRAReport` or `None`): the report of the last initialisation.

    Raises:
        ValueError / TypeError: bad settings, at construction; the checks of `quailora_init` at train begin.

    Example:

    ```python
    trainer = SFTTrainer(..., callbacks=[QuAILoRAInitCallback(calibration_dataset=texts, solver="als")])
    ```
    """

    def __init__(
        self,
        calibration_dataset=None,
        num_samples: int | None = 128,
        max_length: int = 512,
        solver: str = "closed_form",
        config: QuAILoRAConfig | None = None,
        full_precision_weights=None,
        tokenizer=None,
        adapter_name: str = "default",
        report_file: str | None = "quailora_report.json",
    ):
        # Hyperparameters
        if config is None:
            config = QuAILoRAConfig(num_samples=num_samples, max_length=max_length, solver=solver)
        elif not isinstance(config, QuAILoRAConfig):
            raise TypeError(f"`config` must be a QuAILoRAConfig, got {type(config).__name__}.")
        if calibration_dataset is not None and hasattr(calibration_dataset, "__len__") and len(calibration_dataset) == 0:
            raise ValueError("`calibration_dataset` is empty; give calibration texts or leave it None.")
        self.config = config
        self.calibration_dataset = calibration_dataset
        self.full_precision_weights = full_precision_weights
        self.tokenizer = tokenizer
        self.adapter_name = adapter_name
        self.report_file = report_file
        # Internal state
        self.report: QuAILoRAReport | None = None

    def _calibration_for_this_process(self, train_dataloader):
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self.calibration_dataset is None:
            if train_dataloader is None:
                raise ValueError("QuAILoRAInitCallback has no calibration_dataset and the trainer no train dataloader.")
            # Already sharded per process by accelerate: take this process's share of num_samples.
            per_process = None if self.config.num_samples is None else -(-self.config.num_samples // world)
            return train_dataloader, dataclasses.replace(self.config, num_samples=per_process)
        data = self.calibration_dataset
        indexable = isinstance(data, torch.Tensor) or hasattr(data, "select") or (
            isinstance(data, list) and all(isinstance(item, str) for item in data)
        )
        total = min(self.config.num_samples or len(data), len(data)) if indexable else 0
        # Shard only when every process gets at least one sample; otherwise every process calibrates on all of it,
        # which gives the same normalised H (matrices and token counts are both summed) and keeps every process in
        # the collectives (a process raising "empty" alone would leave the others waiting in all_reduce).
        if world > 1 and indexable and total >= world:
            indices = list(range(rank, total, world))
            if isinstance(data, torch.Tensor):
                data = data[indices]
            elif hasattr(data, "select"):
                data = data.select(indices)
            else:
                data = [data[i] for i in indices]
        return data, self.config

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):
        if state.global_step > 0:
            logger.info("Resuming at step %d: QuAILoRA initialisation skipped (checkpoint weights kept).", state.global_step)
            return
        model = _unwrap_model(model)
        if not find_lora_layers(model, self.adapter_name):
            raise ValueError(
                f"QuAILoRAInitCallback: the trainer's model has no LoRA layers with adapter {self.adapter_name!r}; "
                "pass a peft model or `peft_config=` to the trainer."
            )
        scaling = getattr(args, "rank_scaling", None)
        if scaling not in (None, "constant") and state.is_world_process_zero:
            logger.warning(
                "QuAILoRA solves for the adapter's scaling α/r, but this trainer uses rank_scaling=%r: a truncated rank "
                "b runs at a different scaling and starts away from its optimum (at small b worse than B = 0). Use "
                "rank_scaling='constant' with QuAILoRA.",
                scaling,
            )
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap their tokenizer
        calibration, config = self._calibration_for_this_process(train_dataloader)
        self.report = quailora_init(
            model,
            calibration,
            config,
            tokenizer=tokenizer,
            full_precision_weights=self.full_precision_weights,
            adapter_name=self.adapter_name,
        )
        if state.is_world_process_zero:
            logger.info(self.report.summary())
            if self.report_file and args.output_dir:
                os.makedirs(args.output_dir, exist_ok=True)
                with open(os.path.join(args.output_dir, self.report_file), "w") as handle:
                    json.dump(self.report.to_dict(), handle, indent=1)


class RankSweepCallback(TrainerCallback):
    """Benchmark every rank with lm-eval at the end of training (and every N evaluations), logged like any metric.

    The per-rank metrics go through `trainer.log`, so they reach TensorBoard / W&B / `log_history` with
    `report_to`, as `rank_sweep/{task}/{metric}@r{b}`; the main process also writes `results.json`, `results.md` and
    `results.png` into `output_dir/rank_sweep`.

    Args:
        trainer (`transformers.Trainer`): the trainer whose model is evaluated (trl's `LogCompletionsCallback` pattern).
        ranks (`list[int]` or `str`): ranks to evaluate, e.g. `[1, 2, 4, 8]`.
        tasks (`list[str]` or `str`, defaults to `"quailora_wiki_ppl"`): lm-eval tasks (see `evaluate_ranks`).
        every_n_evals (`int`, *optional*): also sweep after every n-th `evaluate()`; `None`: only at train end.
        rank_scaling (`str`, *optional*): defaults to the trainer's `args.rank_scaling` (else `"per_rank"`).
        **evaluate_kwargs: passed to `evaluate_ranks` (`limit`, `batch_size`, `max_length`, `num_fewshot`, …).

    Example:

    ```python
    trainer = DynamicRankTrainer(...)
    trainer.add_callback(RankSweepCallback(trainer, ranks=[1, 4, 16], tasks="quailora_wiki_ppl", limit=20))
    ```
    """

    def __init__(self, trainer, ranks, tasks="quailora_wiki_ppl", every_n_evals: int | None = None,
                 rank_scaling: str | None = None, **evaluate_kwargs):
        # Hyperparameters
        from .lm_eval_bridge import parse_ranks, resolve_tasks

        if every_n_evals is not None and (not isinstance(every_n_evals, int) or every_n_evals < 1):
            raise ValueError(f"`every_n_evals` ({every_n_evals}) must be a positive integer or None.")
        self.trainer = trainer
        self.ranks = parse_ranks(ranks)
        self.tasks, _ = resolve_tasks(tasks, evaluate_kwargs.get("include_path"))  # fail now, not after training
        self.every_n_evals = every_n_evals
        self.rank_scaling = rank_scaling or getattr(trainer.args, "rank_scaling", "per_rank")
        self.evaluate_kwargs = evaluate_kwargs
        # Internal state
        self._evaluations = 0
        self.history: list[dict] = []

    def _sweep(self, args, state) -> None:
        from .lm_eval_bridge import evaluate_ranks

        model = _unwrap_model(self.trainer.model)
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
