"""`DynamicRankTrainer`: trl's `SFTTrainer` training one LoRA so that every rank truncation works on its own.

Methods: DyLoRA (Valipour et al., EACL 2023), QDyLoRA (Rajabzadeh et al., EMNLP 2024 Industry), and SoFT
(Kavehzadeh et al., 2023) along the rank axis. See `truncation.py` for the truncation mechanism.

Example:

```python
from peft import LoraConfig
from hf_quailora import DynamicRankConfig, DynamicRankTrainer, export_rank

args = DynamicRankConfig(output_dir="out", min_rank=1, eval_ranks=[1, 2, 4, 8], report_to="none")
trainer = DynamicRankTrainer(model, args=args, train_dataset=train, eval_dataset=held_out,
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
trainer.train()
print(trainer.evaluate())  # eval_loss, eval_loss@r1, eval_loss@r2, ...
export_rank(trainer.model, 2, "out/rank-2")  # with the scaling the trainer used
```

Two processes on a CPU: `torchrun --nproc_per_node 2 train.py` (gloo); every process draws the same rank sequence.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import SFTTrainer

from .._io_utils import staged_folder
from .._peft_utils import active_adapter_name, common_lora_rank, record_adapter_facts
from ..quantization import prepare_for_exact_weights
from .config import DynamicRankConfig
from .rank_mask import enable_static_rank
from .sampler import RankSampler, SubModel, step_plan
from .spec import (
    METADATA_FILE,
    QUAILORA_RANK_SCALING,
    DynamicRankMetadata,
    check_rank_settings,
    default_eval_ranks,
    quailora_will_initialise,
    resolve_rank_scaling,
)
from .truncation import find_dynamic_rank_layers, use_rank


logger = logging.getLogger(__name__)

RANK_STATE_NAME = "dynamic_rank_state.pt"
_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_preparation_time")
_NOT_PER_RANK = ("num_tokens",)  # trl's count of training tokens seen, logged with evaluations too


class _CompileFallbackWatch(logging.Filter):
    """Turns dynamo's quiet falls back to eager into one plain warning per cause (a filter on dynamo's loggers
    that lets every record through: dynamo's own message still appears)."""

    LOGGERS = ("torch._dynamo.convert_frame", "torch._dynamo.exc")
    CAUSES = {
        "hit config.": (
            "torch.compile hit dynamo's recompile limit: from here on the model's forward runs uncompiled (eager), "
            "as fast as without torch_compile and no faster. With dynamic rank the rank itself never recompiles "
            "(static-shape truncation); something else changes between steps (see dynamo's message above, "
            "TORCH_LOGS=recompiles). Raise torch._dynamo.config.recompile_limit or remove the cause."
        ),
        "Backend compiler": (
            "torch.compile's backend failed on part of the model: dynamo split the graph there and runs that part "
            "uncompiled (eager), more slowly than compiled. The cause is in dynamo's message above (with a quantized "
            "base, see 'Dynamic rank under torch.compile' in docs/dynamic_rank.md)."
        ),
    }

    def __init__(self):
        super().__init__()
        self.warned: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            message = str(record.msg)
            for cause, text in self.CAUSES.items():
                if cause in message and cause not in self.warned:
                    self.warned.add(cause)
                    logger.warning(text)
        return True

    def install(self) -> None:
        for name in self.LOGGERS:
            if self not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(self)


_COMPILE_WATCH = _CompileFallbackWatch()  # one per process: each cause is said once


class DynamicRankTrainer(SFTTrainer):
    """An `SFTTrainer` that draws one LoRA rank per optimizer step (or sums the losses of a rank set, SoFT).

    - One step rule: at the first micro-step of each gradient-accumulation cycle, `step_plan` gives the step's
      sub-models (rank, weight); each one's weighted loss is back-propagated in turn under its rank, held during
      forward *and* backward, so gradient checkpointing recomputes at the same rank, and the gradients sum to those
      of `Σ weight · loss`. DyLoRA/QDyLoRA: one rank with weight 1; SoFT (`soft_ranks`): the fixed rank set.
    - The DyLoRA rank is drawn from a seeded `RankSampler` (identical in every process; checked with a broadcast
      under `torch.distributed`) and logged as `rank` with the loss (the mean over the logging window when
      `logging_steps > 1`; `trainer.rank_history` keeps every `[step, rank]`).
    - trl's `num_tokens` counts each batch once, however many sub-models a step trains.
    - `evaluate()` reports `eval_loss` at `max_rank` and `eval_loss@r{b}` for every `eval_ranks` b, in one call; so
      too trl's own metrics (`eval_mean_token_accuracy@r{b}`, `eval_entropy@r{b}`) and `eval_perplexity@r{b}`.
    - With `torch_compile=True` truncation keeps static shapes (`enable_static_rank`): one compiled graph serves every
      rank, SoFT's rank sets and the evaluation; if dynamo still falls back to eager, a warning says so once.
    - The sampler state is written to every checkpoint (`dynamic_rank_state.pt`) and restored by
      `train(resume_from_checkpoint=...)`; a checkpoint written with another rank range is refused.

    Args:
        model: as for `SFTTrainer`; it must carry peft LoRA layers (a `PeftModel`, or pass `peft_config`).
        args (`DynamicRankConfig`, *optional*): the configuration.
        **kwargs: the other arguments of `SFTTrainer`.

    Raises:
        TypeError: `args` is not a `DynamicRankConfig`.
        ValueError: no LoRA layers, `max_rank` above the LoRA r, eval/SoFT/choice ranks out of range.

    Example:

    ```python
    trainer = DynamicRankTrainer(peft_model, args=DynamicRankConfig("out", bf16=False), train_dataset=data)
    trainer.train()
    ```
    """

    _tag_names = ["trl", "sft", "dynamic-rank"]

    def __init__(self, model=None, args: DynamicRankConfig | None = None, *positional, **kwargs):
        # Arguments
        if args is None:
            args = DynamicRankConfig("dynamic-rank-output")
        if not isinstance(args, DynamicRankConfig):
            raise TypeError(f"`args` must be a DynamicRankConfig; got {type(args).__name__}.")
        super().__init__(model, args, *positional, **kwargs)

        # LoRA layers and the rank range, checked against the model before any training
        self._adapter_name = active_adapter_name(self.model)
        lora_r = common_lora_rank(find_dynamic_rank_layers(self.model, self._adapter_name), self._adapter_name)
        self.max_rank = check_rank_settings(args, lora_r)
        self.eval_ranks = sorted(args.eval_ranks or default_eval_ranks(args.min_rank, self.max_rank))
        self.rank_scaling = resolve_rank_scaling(self.model, args.rank_scaling, self._adapter_name,
                                                 callbacks=self.callback_handler.callbacks)
        logger.info("rank_scaling: %r%s.", self.rank_scaling, "" if args.rank_scaling else " (not set)")
        record_adapter_facts(self.model, self._adapter_name, rank_scaling=self.rank_scaling, min_rank=args.min_rank,
                             max_rank=self.max_rank, update_rule=args.update_rule)
        if args.torch_compile:  # one graph at every rank: the rank becomes a tensor, the factors keep their shapes
            enable_static_rank(self.model, self._adapter_name)
            _COMPILE_WATCH.install()
        # The CPU fast path of bnb 4-bit layers repacks weights on the first no-grad eval pass (methods.md §5)
        prepare_for_exact_weights(self.model)

        # Rank state
        self.rank_sampler = RankSampler.from_config(args, self.max_rank)
        self.current_rank: int | None = None  # the last rank drawn
        self.rank_history: list[list[int]] = []  # [global_step, rank] per optimizer step
        self._plan: list[SubModel] | None = None  # the sub-models of the current optimizer step
        self._plan_step: int | None = None
        self._sub_model: SubModel | None = None  # the one whose loss compute_loss is computing
        self._repeated_tokens = 0  # tokens trl counted more than once (one count per sub-model)

    # -----------------------------------------------------------------------------------------------------------------
    # Training

    def use_rank(self, b: int):
        """`use_rank` on the trainer's model with the configured update rule and scaling."""
        return use_rank(
            self.model,
            b,
            update_rule=self.args.update_rule,
            rank_scaling=self.rank_scaling,
            min_rank=self.args.min_rank,
            adapter_name=self._adapter_name,
        )

    def _warn_about_quailora_scaling(self) -> None:
        """QuAILoRA solves for peft's scaling α/r: another scaling at rank b starts away from its optimum."""
        with_quailora = quailora_will_initialise(self.callback_handler.callbacks)
        if with_quailora and self.rank_scaling != QUAILORA_RANK_SCALING and self.is_world_process_zero():
            logger.warning(
                "QuAILoRA solves for the adapter's scaling α/r, but this trainer uses rank_scaling=%r: a truncated rank "
                "b runs at a different scaling and starts away from its optimum (at small b worse than B = 0). Use "
                "rank_scaling='constant' with QuAILoRA.",
                self.rank_scaling,
            )

    def _draw_rank(self) -> int:
        rank = self.rank_sampler.sample()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process draws from the same seeded generator; a different draw means a different seed or state,
            # and averaging gradients of different sub-models would be silently wrong.
            device = self.args.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            reference = torch.tensor([rank], device=device)
            torch.distributed.broadcast(reference, src=0)
            if int(reference.item()) != rank:
                raise RuntimeError(
                    f"Process {torch.distributed.get_rank()} drew rank {rank} but process 0 drew "
                    f"{int(reference.item())}: the processes' rank samplers differ (same `rank_seed` everywhere?)."
                )
        self.current_rank = rank
        self.rank_history.append([self.state.global_step, rank])
        self._metrics["train"]["rank"].append(float(rank))
        return rank

    def training_step(self, model, inputs, num_items_in_batch=None):
        # One plan per optimizer step: the micro-steps of one accumulation cycle share global_step.
        if self._plan is None or self._plan_step != self.state.global_step:
            self._plan, self._plan_step = step_plan(self.args, self._draw_rank), self.state.global_step
        total, counted = None, 0
        for index, sub_model in enumerate(self._plan):
            # Σ weight · loss, one backward per sub-model: the same gradient, with each rank active during its own
            # backward (held through it, so gradient checkpointing recomputes at the right rank).
            self._sub_model = sub_model
            try:
                with self.use_rank(sub_model.rank):
                    loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._sub_model = None
            if index == 0:
                counted = self._trl_token_count()
            total = loss if total is None else total + loss
        # trl counts the batch's tokens in each compute_loss call: every count after the first is a repeat.
        self._repeated_tokens += self._trl_token_count() - counted
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        weight = self._sub_model.weight if self._sub_model is not None else 1.0
        if weight == 1.0:
            return result
        if return_outputs:
            return result[0] * weight, result[1]
        return result * weight

    def _trl_token_count(self) -> int:
        """trl's running count of training tokens, as its `compute_loss` last logged it (`num_tokens`)."""
        return (self._metrics["train"].get("num_tokens") or [0])[-1]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Tokens seen, each batch once: trl's count less the repeats of multi-sub-model steps (SoFT)
        metrics = self._metrics["train" if self.model.training else "eval"]
        if metrics.get("num_tokens"):
            metrics["num_tokens"] = [metrics["num_tokens"][-1] - self._repeated_tokens]
        super().log(logs, start_time)

    # -----------------------------------------------------------------------------------------------------------------
    # Evaluation

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        loop_args = (dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if description != "Evaluation":  # predict(): at max rank only
            with self.use_rank(self.max_rank):
                return super().evaluation_loop(*loop_args)
        per_rank = {}
        for b in [*(b for b in self.eval_ranks if b != self.max_rank), self.max_rank]:  # max rank last, see below
            self._metrics["eval"].clear()
            with self.use_rank(b):
                output = super().evaluation_loop(*loop_args)
            per_rank[b] = {**output.metrics, **self._trl_eval_metrics(metric_key_prefix)}
        # trl's own metrics of the max rank stay in `_metrics["eval"]`: trl's `log()` reports them without a suffix,
        # beside `eval_loss` (also the max rank's).
        for b in sorted(per_rank):
            if b not in self.eval_ranks:
                continue
            # Every metric of the loop (the loss, compute_metrics' results, trl's token accuracy and entropy) at each
            # rank, plus perplexity.
            for key, value in per_rank[b].items():
                if key.startswith(f"{metric_key_prefix}_") and not key.endswith(_TIMING_SUFFIXES):
                    output.metrics[f"{key}@r{b}"] = value
            loss = per_rank[b].get(f"{metric_key_prefix}_loss")
            if loss is not None:
                output.metrics[f"{metric_key_prefix}_perplexity@r{b}"] = math.exp(min(loss, 700.0))
        return output

    def _trl_eval_metrics(self, prefix: str) -> dict[str, float]:
        """trl's evaluation metrics of the loop just run (`mean_token_accuracy`, `entropy`, ...), averaged over batches
        as trl's `log()` averages them; `num_tokens` (tokens trained so far, the same at every rank) left out."""
        return {f"{prefix}_{key}": sum(values) / len(values) for key, values in self._metrics["eval"].items()
                if values and key not in _NOT_PER_RANK}

    # -----------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def _metadata(self) -> DynamicRankMetadata:
        """`dynamic_rank.json` of this run: its rank range, scaling, update rule and the base it trains on."""
        return DynamicRankMetadata.for_model(
            self.model, self._adapter_name, max_rank=self.max_rank, min_rank=self.args.min_rank,
            rank_scaling=self.rank_scaling, update_rule=self.args.update_rule,
        )

    def _save(self, output_dir: str | None = None, state_dict=None):
        # The adapter and dynamic_rank.json are written into a temporary folder and then published together, so an
        # interrupted save never leaves a folder that loads as an adapter without its metadata (or half-written).
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return super()._save(output_dir, state_dict=state_dict)
        with staged_folder(output_dir) as tmp:
            super()._save(str(tmp), state_dict=state_dict)
            self._metadata().save(tmp)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        folder = output_dir or self.args.output_dir
        if self.args.should_save and not os.path.isfile(os.path.join(folder, METADATA_FILE)):
            self._metadata().save(folder)  # save paths that bypass _save (sharded FSDP, XLA)

    def _rank_state(self) -> dict:
        return {"sampler": self.rank_sampler.state_dict(), "rank_history": [list(item) for item in self.rank_history]}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self._rank_state(), os.path.join(folder, RANK_STATE_NAME))

    def _load_rank_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, RANK_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"Checkpoint {checkpoint} has no {RANK_STATE_NAME}: it was not written by DynamicRankTrainer, so the "
                "rank sequence cannot be resumed. Resume from a DynamicRankTrainer checkpoint or start a new run."
            )
        state = torch.load(path, weights_only=True)
        try:
            self.rank_sampler.load_state_dict(state["sampler"])
        except ValueError as error:
            raise ValueError(f"Cannot resume from {checkpoint}: {error}") from None
        self.rank_history = [list(item) for item in state["rank_history"]]

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir}).")
        if resume_from_checkpoint:
            self._load_rank_state(resume_from_checkpoint)
        self._plan, self._plan_step, self.current_rank = None, None, None
        if not resume_from_checkpoint:
            self._warn_about_quailora_scaling()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
