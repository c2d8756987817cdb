"""What each optimizer step trains: `RankSampler` (DyLoRA's draw of one LoRA rank per step, seeded and
checkpointable) and `step_plan`, the one step rule of `DynamicRankTrainer`.

References: DyLoRA (Valipour et al., EACL 2023): `b ~ p_B` over `{r_min … r_max}`, uniform in the paper; SoFT
(Kavehzadeh et al., 2023): the loss of a step sums the losses of a fixed set of nested sub-models.

Example:

```python
from hf_quailora import DynamicRankConfig, RankSampler
from hf_quailora.dynamic_rank.sampler import step_plan

sampler = RankSampler(1, 8, seed=42)
ranks = [sampler.sample() for _ in range(4)]
step_plan(DynamicRankConfig("out", max_rank=8), sampler.sample)  # [SubModel(rank=b, weight=1.0)], b drawn
step_plan(DynamicRankConfig("out", soft_ranks=[1, 8]), sampler.sample)  # [SubModel(1, 1.0), SubModel(8, 1.0)]
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._dist_utils import naming_collective
from .spec import RankDistribution, check_rank_sampling


@dataclass(frozen=True)
class SubModel:
    """One sub-model that a training step trains, and the weight of its loss in the step's loss `Σ weight · L`.

    Attributes:
        rank (`int`): the LoRA rank b it runs at (`use_rank`).
        weight (`float`, defaults to 1.0): the weight of its loss.

    Fields are read by name, so that further axes of a sub-model (e.g. a depth exit) can join with a default that
    leaves the rank-only rules unchanged.

    Example:

    ```python
    SubModel(rank=4)  # DyLoRA's drawn rank, weight 1
    ```
    """

    rank: int
    weight: float = 1.0


def step_plan(config, draw_rank: Callable[[], int]) -> list[SubModel]:
    """The sub-models one optimizer step trains: the one step rule of `DynamicRankTrainer`.

    - DyLoRA / QDyLoRA: one rank drawn by `draw_rank`, with weight 1.
    - SoFT (`config.soft_ranks` set): every rank of `soft_ranks` with its weight of `soft_weights` (1 each when
      omitted); nothing is drawn.

    Args:
        config (`DynamicRankConfig`): the checked configuration.
        draw_rank (`Callable[[], int]`): draws the step's rank (the trainer's seeded, process-checked draw).

    Returns:
        `list[SubModel]`: the sub-models, in the order their losses are back-propagated.

    Example:

    ```python
    step_plan(DynamicRankConfig("out", soft_ranks=[1, 8], soft_weights=[2.0, 1.0]), sampler.sample)
    # [SubModel(rank=1, weight=2.0), SubModel(rank=8, weight=1.0)]
    ```
    """
    if config.soft_ranks is not None:
        weights = config.soft_weights or [1.0] * len(config.soft_ranks)
        return [SubModel(rank=b, weight=float(w)) for b, w in zip(config.soft_ranks, weights)]
    return [SubModel(rank=draw_rank())]


def check_same_rank(rank: int, device: torch.device) -> None:
    """Under `torch.distributed`, check that this process drew the rank process 0 drew (one broadcast).

    Every process draws from the same seeded generator; a different draw means a different seed or state, and averaging
    gradients of different sub-models would be silently wrong. A process that died fails the broadcast on the others
    at once (`naming_collective`).

    Raises:
        RuntimeError: the draws differ, or another process died or stopped answering.
    """
    device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    reference = torch.tensor([rank], device=device)
    with naming_collective("the broadcast of the LoRA rank drawn for this step"):
        torch.distributed.broadcast(reference, src=0)
    if int(reference.item()) != rank:
        raise RuntimeError(
            f"Process {torch.distributed.get_rank()} drew rank {rank} but process 0 drew "
            f"{int(reference.item())}: the processes' rank samplers differ (same `rank_seed` everywhere?)."
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
        check_rank_sampling(min_rank, max_rank, distribution, choices, weights)
        self._start(min_rank, max_rank, distribution, choices, weights, seed)

    @classmethod
    def from_config(cls, config, max_rank: int) -> RankSampler:
        """The sampler of a `DynamicRankConfig` whose largest rank is `max_rank`, without checking again.

        The values are trusted: `DynamicRankConfig.__post_init__` checked them, and `check_rank_settings` checked
        them against `max_rank` (what `DynamicRankTrainer` does before it builds its sampler). The seed is
        `rank_seed`, else `seed`.

        Example:

        ```python
        sampler = RankSampler.from_config(args, max_rank=check_rank_settings(args, lora_r=16))
        ```
        """
        sampler = cls.__new__(cls)
        seed = config.rank_seed if config.rank_seed is not None else config.seed
        sampler._start(config.min_rank, max_rank, config.rank_distribution, config.rank_choices, config.rank_weights,
                       seed)
        return sampler

    def _start(self, min_rank, max_rank, distribution, choices, weights, seed) -> None:
        """Set up checked settings: the uniform distribution over `[min_rank, max_rank]` or the weighted one."""
        if distribution == "uniform":
            choices = range(min_rank, max_rank + 1)
        weights = [1.0] * len(choices) if weights is None else weights
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
