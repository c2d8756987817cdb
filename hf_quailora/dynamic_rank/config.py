"""`DynamicRankConfig`: the `SFTConfig` of `DynamicRankTrainer` (DyLoRA, QDyLoRA and SoFT along the rank axis).

Example:

```python
from hf_quailora import DynamicRankConfig

args = DynamicRankConfig(output_dir="out", min_rank=1, update_rule="nested", eval_ranks=[1, 2, 4, 8], report_to="none")
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from trl import SFTConfig

from .exits import check_exit_options, check_exit_settings
from .faults import NONFINITE_ACTIONS
from .spec import (
    DEFAULT_UPDATE_RULE,
    RANK_DISTRIBUTIONS,
    RANK_SCALINGS,
    UPDATE_RULES,
    RankDistribution,
    RankScaling,
    UpdateRule,
    check_choice,
    check_integer,
    check_rank_sampling,
    check_weighted_ranks,
)


_NO_MAX_RANK = 1 << 30  # max_rank not set: the trainer checks the ranks against the model's LoRA r


def _has_bf16_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class DynamicRankConfig(SFTConfig):
    r"""Configuration of [`DynamicRankTrainer`]: an [`~trl.SFTConfig`] plus the dynamic-rank options.

    One LoRA of maximum rank is trained so that every truncation `b` works on its own (DyLoRA, Valipour et al. 2023;
    QDyLoRA, Rajabzadeh et al. 2024), or with the summed loss of several ranks every step (SoFT, Kavehzadeh et al.
    2023).

    Parameters:
        > Rank sampling

        min_rank (`int`, defaults to 1): smallest rank drawn.
        max_rank (`int`, *optional*): largest rank drawn; defaults to the LoRA r of the model (the smallest r when
            layers differ). Must not exceed it.
        rank_distribution (`str`, defaults to `"uniform"`): `"uniform"` over `[min_rank, max_rank]` (DyLoRA) or
            `"weighted"` over `rank_choices` with `rank_weights`.
        rank_choices (`list[int]`, *optional*): ranks of the `"weighted"` distribution.
        rank_weights (`list[float]`, *optional*): positive weights of `rank_choices` (equal when omitted).
        rank_seed (`int`, *optional*): seed of the rank generator; defaults to `seed`. Every process uses the same.

        > Update rule and scaling

        update_rule (`str`, defaults to `"frozen"`): `"frozen"` (DyLoRA: only component b learns; at `b == min_rank`
            all components `≤ min_rank` learn, since they would otherwise never do) or `"nested"` (QDyLoRA: every
            component `≤ b` learns).
        rank_scaling (`str`, *optional*): scaling at rank b: `"per_rank"` `α/b` (DyLoRA), `"constant"` peft's `α/r`
            at every b (keeps QuAILoRA's sorted initialisation optimal at every rank), `"rslora"` `α/√b`. When not
            set, the trainer picks `"constant"` if a `QuAILoRAInitCallback` initialises the adapter, else the scaling
            recorded for the adapter, else `"constant"` on a model `quailora_init` already ran on and `"per_rank"`
            otherwise (`spec.resolve_rank_scaling`).

        > SoFT

        soft_ranks (`list[int]`, *optional*): when set, SoFT mode: the loss of every step is the weighted sum of the
            losses at these ranks (no sampling).
        soft_weights (`list[float]`, *optional*): weights of `soft_ranks` (1 each when omitted).
        soft_exits (`list[int]`, *optional*): SoFT by depth: exits as layer counts (`exits.exit_layers` turns
            fractions of the depth into counts); the loss of every step is the weighted sum of the losses of the
            sub-models "first k layers, then the model's own final norm and LM head", from one forward pass. Each
            exit runs at the step's sampled rank; with `soft_ranks`, the pair (rank b, exit k) is weighted
            `soft_weights[b] · soft_exit_weights[k]`. Not with `torch_compile`, `use_liger_kernel`, label smoothing
            or `loss_type` other than `"nll"`.
        soft_exit_weights (`list[float]`, *optional*): weights of `soft_exits` (1 each when omitted).

        > Evaluation

        eval_ranks (`list[int]`, *optional*): ranks that `evaluate()` reports as `eval_loss@r{b}` (with trl's
            `eval_mean_token_accuracy@r{b}` and `eval_entropy@r{b}`); defaults to `min_rank`, the powers of two
            between, and `max_rank`.
        eval_exits (`list[int]`, *optional*): exits that `evaluate()` also reports, as `eval_loss@e{k}r{b}` at every
            eval rank b; defaults to `soft_exits`.

        > Faults

        nonfinite (`str`, defaults to `"raise"`): what a non-finite loss or gradient does: `"raise"` stops the run
            with a `FloatingPointError` naming the optimizer step and its rank(s), before the step is applied;
            `"skip"` drops the step with a warning. See `faults.NonFiniteCheck`.

        > Defaults that differ from `SFTConfig`

        bf16 (`bool`, *optional*): when not set, `True` only if a CUDA/XPU device is present (SFTConfig turns it on
            everywhere, which fails on a CPU-only machine).
    """

    # Rank sampling
    min_rank: int = field(default=1, metadata={"help": "Smallest rank drawn."})
    max_rank: int | None = field(
        default=None, metadata={"help": "Largest rank drawn; defaults to the LoRA r. Must not exceed it."}
    )
    rank_distribution: RankDistribution = field(
        default="uniform",
        metadata={"help": "Distribution of the rank drawn each optimizer step.", "choices": list(RANK_DISTRIBUTIONS)},
    )
    rank_choices: list[int] | None = field(default=None, metadata={"help": "Ranks of the 'weighted' distribution."})
    rank_weights: list[float] | None = field(default=None, metadata={"help": "Weights of `rank_choices`."})
    rank_seed: int | None = field(default=None, metadata={"help": "Seed of the rank generator; defaults to `seed`."})
    # Update rule and scaling
    update_rule: UpdateRule = field(
        default=DEFAULT_UPDATE_RULE,
        metadata={"help": "'frozen': only component b learns (DyLoRA); 'nested': all <= b (QDyLoRA).",
                  "choices": list(UPDATE_RULES)},
    )
    rank_scaling: RankScaling | None = field(
        default=None,
        metadata={"help": "Scaling at rank b: alpha/b, peft's constant alpha/r, or alpha/sqrt(b); default: constant "
                  "with QuAILoRA, else alpha/b.", "choices": list(RANK_SCALINGS)},
    )
    # SoFT
    soft_ranks: list[int] | None = field(
        default=None, metadata={"help": "SoFT mode: sum the losses at these ranks every step instead of sampling."}
    )
    soft_weights: list[float] | None = field(default=None, metadata={"help": "Weights of `soft_ranks`."})
    soft_exits: list[int] | None = field(
        default=None, metadata={"help": "SoFT by depth: sum the losses of these exits (layer counts) every step."}
    )
    soft_exit_weights: list[float] | None = field(default=None, metadata={"help": "Weights of `soft_exits`."})
    # Evaluation
    eval_ranks: list[int] | None = field(
        default=None, metadata={"help": "Ranks evaluate() reports as eval_loss@r{b}; default: powers of two."}
    )
    eval_exits: list[int] | None = field(
        default=None, metadata={"help": "Exits evaluate() reports as eval_loss@e{k}r{b}; default: `soft_exits`."}
    )
    # Faults
    nonfinite: Literal["raise", "skip"] = field(
        default="raise",
        metadata={"help": "A non-finite loss or gradient: 'raise' stops the run before the step is applied, naming "
                  "the step and rank; 'skip' drops the step with a warning.", "choices": list(NONFINITE_ACTIONS)},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            self.bf16 = _has_bf16_accelerator()
        super().__post_init__()
        _check_warmup(self)

        # Rank sampling (max_rank=None: checked against the LoRA r by the trainer)
        upper = self.max_rank if self.max_rank is not None else _NO_MAX_RANK
        check_rank_sampling(self.min_rank, upper, self.rank_distribution, self.rank_choices, self.rank_weights)
        if self.rank_seed is not None:
            check_integer("rank_seed", self.rank_seed)
        # Update rule and scaling
        check_choice("update_rule", self.update_rule, UPDATE_RULES)
        if self.rank_scaling is not None:
            check_choice("rank_scaling", self.rank_scaling, RANK_SCALINGS)
        # SoFT
        if self.soft_ranks is not None:
            check_weighted_ranks(
                self.soft_ranks, self.soft_weights, self.min_rank, upper, "soft_ranks", "soft_weights"
            )
        elif self.soft_weights is not None:
            raise ValueError(f"`soft_weights` ({self.soft_weights}) needs `soft_ranks`; set both or neither.")
        # Evaluation
        if self.eval_ranks is not None:
            if len(self.eval_ranks) == 0:
                raise ValueError("`eval_ranks` is empty; give at least one rank or leave it None for the default.")
            check_weighted_ranks(self.eval_ranks, None, 1, upper, "eval_ranks", "eval_weights")
        check_exit_settings(self.soft_exits, self.soft_exit_weights, self.eval_exits)
        if self.soft_exits is not None:
            check_exit_options(self)
        # Faults
        check_choice("nonfinite", self.nonfinite, NONFINITE_ACTIONS)

    @property
    def soft_mode(self) -> bool:
        return self.soft_ranks is not None


def _check_warmup(args) -> None:
    """A warmup that the scheduler would drop: transformers' `constant` schedule (`get_constant_schedule`) ignores
    `warmup_steps`, silently, so a config asking for both trains without the warmup it names (QLoRA's own scripts,
    and this repository's GPU recipes until they were fixed, did)."""
    from transformers.trainer_utils import SchedulerType

    if SchedulerType(args.lr_scheduler_type) == SchedulerType.CONSTANT and args.warmup_steps > 0:
        raise ValueError(
            f"`warmup_steps` ({args.warmup_steps}) is ignored by `lr_scheduler_type='constant'` (transformers' "
            "constant schedule has no warmup). Use `lr_scheduler_type='constant_with_warmup'` to warm up, or set "
            "`warmup_steps` to 0."
        )
