"""`DynamicRankMixin`: dynamic-rank training (DyLoRA, QDyLoRA, SoFT along the rank axis) in any transformers
`Trainer`.

Methods: DyLoRA (Valipour et al., EACL 2023), QDyLoRA (Rajabzadeh et al., EMNLP 2024 Industry), and SoFT
(Kavehzadeh et al., 2023) along the rank axis. See `truncation.py` for the truncation mechanism and `trainer.py`
for `DynamicRankTrainer`, this mixin over trl's `SFTTrainer`.

The settings come from the trainer's `args` when they carry the dynamic-rank fields (`DynamicRankConfig`, or any
`TrainingArguments` subclass with them; a missing field takes `DynamicRankConfig`'s default), or from a
`DynamicRankSettings` passed as `dynamic_rank=`. trl's own metrics (`self._metrics`: `num_tokens`,
`mean_token_accuracy@r{b}`, ...) exist only on trl's trainers; over a plain `Trainer` the mixin logs `rank` itself
and `evaluate()` reports `eval_loss@r{b}` and `eval_perplexity@r{b}`.

Example:

```python
from transformers import Trainer, TrainingArguments
from hf_quailora.dynamic_rank.mixin import DynamicRankMixin, DynamicRankSettings


class DynamicRankPlainTrainer(DynamicRankMixin, Trainer):
    pass


trainer = DynamicRankPlainTrainer(peft_model, args=TrainingArguments("out", report_to="none"),
                                  train_dataset=tokenized, dynamic_rank=DynamicRankSettings(eval_ranks=[1, 4, 8]))
trainer.train()
```
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import get_last_checkpoint

from .._dist_utils import full_tensor, has_fsdp1_modules, has_sharded_parameters, is_distributed, run_on_main_process
from .._io_utils import staged_folder
from .._peft_utils import active_adapter_name, common_lora_rank, record_adapter_facts
from ..quantization import prepare_for_exact_weights
from .checkpoints import (
    RANK_STATE_NAME,  # noqa: F401 (importable from here, as before)
    keep_parameter_dtypes,
    load_rank_state,
    remove_stale_staging,
    save_checkpoint_atomically,
)
from .exits import DepthExits
from .faults import NonFiniteCheck, hold_output_dir
from .fsdp1 import fsdp1_adapter_state, write_fsdp1_adapter
from .model_card import carry_card, write_adapter_card
from .rank_mask import COMPILE_WATCH, enable_static_rank
from .sampler import RankSampler, SubModel, check_same_rank, step_plan
from .settings import DynamicRankSettings
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

_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_preparation_time")
_NOT_PER_RANK = ("num_tokens",)  # trl's count of training tokens seen, logged with evaluations too


class DynamicRankMixin:
    """Draws one LoRA rank per optimizer step (or sums the losses of a rank set, SoFT) in any transformers `Trainer`.

    Put it before the trainer class: `class MyTrainer(DynamicRankMixin, Trainer)`. `DynamicRankTrainer` is this
    mixin over trl's `SFTTrainer`; its docstring describes the step rule, the logging, `evaluate()` at every rank
    and the checkpoints, all implemented here.

    Args:
        *args, **kwargs: the trainer's own arguments.
        dynamic_rank (`DynamicRankSettings`, *optional*): the settings; by default `args` itself when it is a
            `DynamicRankConfig`, else `DynamicRankSettings.from_args(args)`.

    Raises:
        ValueError: no LoRA layers, `max_rank` above the LoRA r, eval/SoFT/choice ranks out of range.
    """

    def __init__(self, *args, dynamic_rank: DynamicRankSettings | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        from .config import DynamicRankConfig

        if dynamic_rank is None:
            is_config = isinstance(self.args, DynamicRankConfig)
            dynamic_rank = self.args if is_config else DynamicRankSettings.from_args(self.args)
        self.rank_settings = settings = dynamic_rank

        # LoRA layers and the rank range, checked against the model before any training
        self._adapter_name = active_adapter_name(self.model)
        lora_r = common_lora_rank(find_dynamic_rank_layers(self.model, self._adapter_name), self._adapter_name)
        self.max_rank = check_rank_settings(settings, lora_r)
        self.eval_ranks = sorted(settings.eval_ranks or default_eval_ranks(settings.min_rank, self.max_rank))
        self.rank_scaling = resolve_rank_scaling(self.model, settings.rank_scaling, self._adapter_name,
                                                 callbacks=self.callback_handler.callbacks)
        logger.info("rank_scaling: %r%s.", self.rank_scaling, "" if settings.rank_scaling else " (not set)")
        record_adapter_facts(self.model, self._adapter_name, rank_scaling=self.rank_scaling,
                             min_rank=settings.min_rank, max_rank=self.max_rank, update_rule=settings.update_rule)
        if getattr(self.args, "torch_compile", False):  # one graph at every rank: the rank becomes a tensor
            enable_static_rank(self.model, self._adapter_name)
            COMPILE_WATCH.install()
        # The CPU fast path of bnb 4-bit layers repacks weights on the first no-grad eval pass (methods.md §5)
        prepare_for_exact_weights(self.model)

        # Rank state
        self.rank_sampler = RankSampler.from_config(settings, self.max_rank)
        self.current_rank: int | None = None  # the last rank drawn
        self.rank_history: list[list[int]] = []  # [global_step, rank] per optimizer step
        self._plan: list[SubModel] | None = None  # the sub-models of the current optimizer step
        self._plan_step: int | None = None
        self._sub_model: SubModel | None = None  # the one whose loss compute_loss is computing
        self._repeated_tokens = 0  # tokens trl counted more than once (one count per sub-model)
        self._ranks_to_log: list[int] = []  # ranks drawn since the last log (a plain Trainer; trl keeps _metrics)
        self._nonfinite = NonFiniteCheck(self, getattr(self.args, "nonfinite", "raise"))  # faults.py
        self.add_callback(self._nonfinite)
        with_exits = settings.soft_exits or settings.eval_exits  # SoFT by depth (exits.py)
        self.depth_exits = DepthExits(self, settings) if with_exits else None

    # -----------------------------------------------------------------------------------------------------------------
    # Training

    def use_rank(self, b: int):
        """`use_rank` on the trainer's model with the configured update rule and scaling."""
        return use_rank(
            self.model,
            b,
            update_rule=self.rank_settings.update_rule,
            rank_scaling=self.rank_scaling,
            min_rank=self.rank_settings.min_rank,
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
        if is_distributed():
            check_same_rank(rank, self.args.device)  # sampler.py: a broadcast from process 0
        self.current_rank = rank
        self.rank_history.append([self.state.global_step, rank])
        if hasattr(self, "_metrics"):  # trl averages its metrics over the logging window in log()
            self._metrics["train"]["rank"].append(float(rank))
        else:
            self._ranks_to_log.append(rank)
        return rank

    def training_step(self, model, inputs, num_items_in_batch=None):
        # One plan per optimizer step: the micro-steps of one accumulation cycle share global_step.
        if self._plan is None or self._plan_step != self.state.global_step:
            self._plan, self._plan_step = step_plan(self.rank_settings, self._draw_rank), self.state.global_step
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
            self._nonfinite.check_loss(loss, sub_model.rank)
            if index == 0:
                counted = self._trl_token_count()
            total = loss if total is None else total + loss
        # trl counts the batch's tokens in each compute_loss call: every count after the first is a repeat.
        self._repeated_tokens += self._trl_token_count() - counted
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._sub_model is not None and self.depth_exits is not None and self.depth_exits.train_exits:
            result = self.depth_exits.compute_loss(super().compute_loss, model, inputs, return_outputs,
                                                   num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        weight = self._sub_model.weight if self._sub_model is not None else 1.0
        if weight == 1.0:
            return result
        if return_outputs:
            return result[0] * weight, result[1]
        return result * weight

    def _trl_token_count(self) -> int:
        """trl's running count of training tokens, as its `compute_loss` last logged it (`num_tokens`)."""
        metrics = getattr(self, "_metrics", None)  # trl's trainers only
        return (metrics["train"].get("num_tokens") or [0])[-1] if metrics is not None else 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if hasattr(self, "_metrics"):
            # Tokens seen, each batch once: trl's count less the repeats of multi-sub-model steps (SoFT)
            metrics = self._metrics["train" if self.model.training else "eval"]
            if metrics.get("num_tokens"):
                metrics["num_tokens"] = [metrics["num_tokens"][-1] - self._repeated_tokens]
        elif self._ranks_to_log and "loss" in logs:  # a plain Trainer: the mean rank of the logging window
            logs = {**logs, "rank": sum(self._ranks_to_log) / len(self._ranks_to_log)}
            self._ranks_to_log = []
        super().log(logs, start_time)

    # -----------------------------------------------------------------------------------------------------------------
    # Evaluation

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        loop_args = (dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if description == "Evaluation" and self.depth_exits is not None:  # every (exit, rank): exits.py
            return self.depth_exits.evaluation_loop(self._evaluation_loop_per_rank, loop_args, metric_key_prefix)
        return self._evaluation_loop_per_rank(*loop_args)

    def _evaluation_loop_per_rank(self, *loop_args):
        metric_key_prefix = loop_args[-1]
        if loop_args[1] != "Evaluation":  # predict(): at max rank only
            with self.use_rank(self.max_rank):
                return super().evaluation_loop(*loop_args)
        per_rank = {}
        for b in [*(b for b in self.eval_ranks if b != self.max_rank), self.max_rank]:  # max rank last, see below
            if hasattr(self, "_metrics"):
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
        metrics = getattr(self, "_metrics", {"eval": {}})["eval"]  # none outside trl
        return {f"{prefix}_{key}": sum(values) / len(values) for key, values in metrics.items()
                if values and key not in _NOT_PER_RANK}

    # -----------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def _metadata(self) -> DynamicRankMetadata:
        """`dynamic_rank.json` of this run: its rank range, scaling, update rule and the base it trains on."""
        return DynamicRankMetadata.for_model(
            self.model, self._adapter_name, max_rank=self.max_rank, min_rank=self.rank_settings.min_rank,
            rank_scaling=self.rank_scaling, update_rule=self.rank_settings.update_rule,
        )

    def _save(self, output_dir: str | None = None, state_dict=None):
        # The adapter and dynamic_rank.json are written into a temporary folder and then published together, so an
        # interrupted save never leaves a folder that loads as an adapter without its metadata (or half-written).
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if has_sharded_parameters(self.model):
            return self._save_sharded(output_dir, state_dict)
        if not self.args.should_save:
            return super()._save(output_dir, state_dict=state_dict)
        with staged_folder(output_dir) as tmp:
            carry_card(output_dir, tmp)  # trl's model card: peft updates it, and the deployment section joins it
            super()._save(str(tmp), state_dict=state_dict)
            metadata = self._metadata()
            metadata.save(tmp)
            write_adapter_card(tmp, metadata)

    def _save_sharded(self, output_dir: str, state_dict=None):
        """FSDP2 `DTensor` parameters: every process gathers the adapter's tensors whole (the LoRA factors and other
        trainable ones, not the frozen base), process 0 writes, the others wait; a failure raises on all. FSDP1
        modules: the factors are gathered by `fsdp1.fsdp1_adapter_state` and written by `write_fsdp1_adapter`."""
        fsdp1 = has_fsdp1_modules(self.model)
        if fsdp1:
            state_dict = fsdp1_adapter_state(self.model, self._adapter_name)
        elif state_dict is None:
            trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
            state_dict = {name: full_tensor(value).detach().cpu()
                          for name, value in self.model.state_dict().items()
                          if name in trainable or "lora_" in name or "modules_to_save" in name}

        def write():
            with staged_folder(output_dir) as tmp:
                if fsdp1:  # peft's save_pretrained finds no factors under FSDP1's module names (fsdp1.py)
                    write_fsdp1_adapter(self.model, state_dict, str(tmp), self._adapter_name)
                else:
                    self.model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(str(tmp))
                torch.save(self.args, os.path.join(tmp, TRAINING_ARGS_NAME))
                metadata = self._metadata()
                metadata.save(tmp)
                write_adapter_card(tmp, metadata)

        run_on_main_process(write, what="save_model")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        folder = output_dir or self.args.output_dir
        if self.args.should_save and not os.path.isfile(os.path.join(folder, METADATA_FILE)):
            self._metadata().save(folder)  # save paths that bypass _save (sharded FSDP, XLA)

    def _save_checkpoint(self, model, trial):  # staged, then published by one rename (checkpoints.py)
        save_checkpoint_atomically(self, trial, functools.partial(super()._save_checkpoint, model, trial))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with keep_parameter_dtypes(model if model is not None else self.model):  # peft widens bf16 (checkpoints.py)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _get_output_dir(self, trial) -> str:
        return getattr(self, "_checkpoint_staging", None) or super()._get_output_dir(trial)

    def _run_epoch(self, *args, **kwargs):
        if 0 < self.state.max_steps <= self.state.global_step:  # resumed from the last step: transformers would
            self.control.should_training_stop = True  # train one more step
            return None
        return super()._run_epoch(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        with hold_output_dir(self.args.output_dir):  # a second live run on this folder is refused (faults.py)
            return self._train_holding_output_dir(resume_from_checkpoint, trial, **kwargs)

    def _train_holding_output_dir(self, resume_from_checkpoint, trial, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir}).")
        if resume_from_checkpoint:
            load_rank_state(self, resume_from_checkpoint)
        if self.args.should_save:
            remove_stale_staging(self.args.output_dir)  # what a killed checkpoint save left (checkpoints.py)
        self._plan, self._plan_step, self.current_rank = None, None, None
        if not resume_from_checkpoint:
            self._warn_about_quailora_scaling()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
