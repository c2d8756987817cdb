"""`DynamicRankSettings`: the dynamic-rank fields of `DynamicRankConfig` for trainers whose `args` lack them.

Moved out of `mixin.py` (which re-exports it) to keep that module small.

Example: `DynamicRankSettings(min_rank=2, update_rule="nested", eval_ranks=[2, 4, 8])`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .exits import check_exit_settings
from .spec import (
    DEFAULT_UPDATE_RULE,
    RANK_SCALINGS,
    UPDATE_RULES,
    check_choice,
    check_rank_sampling,
    check_weighted_ranks,
)


@dataclass
class DynamicRankSettings:
    """The dynamic-rank fields of `DynamicRankConfig`, for trainers whose `args` lack them (a plain `Trainer`).

    Every field means what it means in `DynamicRankConfig` (see its docstring), with the same default; `seed` is the
    fallback of `rank_seed` (the trainer's `args.seed` when built by `from_args`).

    Raises:
        TypeError / ValueError: the checks of `DynamicRankConfig`, naming the field.

    Example: `DynamicRankSettings(min_rank=2, update_rule="nested", eval_ranks=[2, 4, 8])`.
    """

    min_rank: int = 1
    max_rank: int | None = None
    rank_distribution: str = "uniform"
    rank_choices: list[int] | None = None
    rank_weights: list[float] | None = None
    rank_seed: int | None = None
    seed: int = 42
    update_rule: str = DEFAULT_UPDATE_RULE
    rank_scaling: str | None = None
    soft_ranks: list[int] | None = None
    soft_weights: list[float] | None = None
    eval_ranks: list[int] | None = None
    soft_exits: list[int] | None = None
    soft_exit_weights: list[float] | None = None
    eval_exits: list[int] | None = None

    def __post_init__(self):
        upper = self.max_rank if self.max_rank is not None else 1 << 30  # else checked against the LoRA r later
        check_rank_sampling(self.min_rank, upper, self.rank_distribution, self.rank_choices, self.rank_weights)
        check_choice("update_rule", self.update_rule, UPDATE_RULES)
        if self.rank_scaling is not None:
            check_choice("rank_scaling", self.rank_scaling, RANK_SCALINGS)
        if self.soft_ranks is not None:
            check_weighted_ranks(self.soft_ranks, self.soft_weights, self.min_rank, upper, "soft_ranks",
                                 "soft_weights")
        elif self.soft_weights is not None:
            raise ValueError(f"`soft_weights` ({self.soft_weights}) needs `soft_ranks`; set both or neither.")
        if self.eval_ranks is not None:
            check_weighted_ranks(self.eval_ranks, None, 1, upper, "eval_ranks", "eval_weights")
        check_exit_settings(self.soft_exits, self.soft_exit_weights, self.eval_exits)

    @classmethod
    def from_args(cls, args) -> DynamicRankSettings:
        """The settings that `args` (any `TrainingArguments`) carries, each missing field at its default."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
