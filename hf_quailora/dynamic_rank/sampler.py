"""`RankSampler`: DyLoRA's draw of one LoRA rank per optimizer step, seeded and checkpointable.

Reference: DyLoRA (Valipour et al., EACL 2023): `b ~ p_B` over `{r_min … r_max}`, uniform in the paper.

Example:

```python
from hf_quailora import RankSampler

sampler = RankSampler(1, 8, seed=42)
ranks = [sampler.sample() for _ in range(4)]
```
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .spec import (
    RANK_DISTRIBUTIONS,
    RankDistribution,
    check_choice,
    check_rank_range,
    check_uniform_ranks,
    check_weighted_ranks,
)


class RankSampler:
    """Seeded draws of the LoRA rank, one per optimizer step (DyLoRA's `b ~ p_B`).

    Every process of a multi-process run builds the same sampler from the same seed and so draws the same sequence;
    `state_dict()` / `load_state_dict()` carry the generator state through checkpoints, so a resumed run continues the
    sequence of the uninterrupted one.

    Args:
        min_rank (`int`): smallest rank drawn (≥ 1).
        max_rank (`int`): largest rank drawn (≥ `min_rank`).
        distribution (`str`, defaults to `"uniform"`): `"uniform"` over `[min_rank, max_rank]` (DyLoRA) or
            `"weighted"` over `choices` with probabilities proportional to `weights`.
        choices (`list[int]`, *optional*): ranks of the `"weighted"` distribution, each in `[min_rank, max_rank]`.
        weights (`list[float]`, *optional*): positive weights, one per choice.
        seed (`int`, defaults to 0): seed of the `torch.Generator`.

    Raises:
        ValueError: a bad range, distribution, choice or weight.

    Example:

    ```python
    sampler = RankSampler(1, 8, seed=42)
    ranks = [sampler.sample() for _ in range(4)]
    ```
    """

    def __init__(
        self,
        min_rank: int,
        max_rank: int,
        distribution: RankDistribution = "uniform",
        choices: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        seed: int = 0,
    ):
        check_rank_range(min_rank, max_rank)
        check_choice("rank_distribution", distribution, RANK_DISTRIBUTIONS)
        if distribution == "uniform":
            check_uniform_ranks(choices, weights)
            choices = list(range(min_rank, max_rank + 1))
            weights = [1.0] * len(choices)
        else:
            choices, weights = check_weighted_ranks(
                choices, weights, min_rank, max_rank, "rank_choices", "rank_weights"
            )
        self.min_rank, self.max_rank = int(min_rank), int(max_rank)
        self.distribution = distribution
        self.choices = [int(c) for c in choices]
        self.weights = [float(w) for w in weights]
        self.seed = int(seed)
        self.num_draws = 0
        self._probabilities = torch.tensor(self.weights, dtype=torch.float64) / sum(self.weights)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def sample(self) -> int:
        """Draw the next rank."""
        index = torch.multinomial(self._probabilities, 1, generator=self.generator).item()
        self.num_draws += 1
        return self.choices[index]

    def describe(self) -> dict:
        """The settings that must match for a checkpoint to be resumed."""
        return {
            "min_rank": self.min_rank,
            "max_rank": self.max_rank,
            "distribution": self.distribution,
            "choices": self.choices,
            "weights": self.weights,
        }

    def state_dict(self) -> dict:
        generator = self.generator.get_state()
        return {**self.describe(), "seed": self.seed, "num_draws": self.num_draws, "generator": generator}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state.

        Raises:
            ValueError: the state was written with a different rank range or distribution.
        """
        saved = {key: state.get(key) for key in self.describe()}
        if saved != self.describe():
            raise ValueError(
                f"The checkpoint's rank sampler was written with {saved}, but this run uses {self.describe()}. "
                "Resume with the same `min_rank`, `max_rank`, `rank_distribution`, `rank_choices` and `rank_weights`, "
                "or start a new run."
            )
        self.seed = int(state["seed"])
        self.num_draws = int(state["num_draws"])
        self.generator.set_state(state["generator"])
