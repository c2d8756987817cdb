"""`DynamicRankTrainer`: trl's `SFTTrainer` training one LoRA so that every rank truncation works on its own.

Methods: DyLoRA (Valipour et al., EACL 2023), QDyLoRA (Rajabzadeh et al., EMNLP 2024 Industry), and SoFT
(Kavehzadeh et al., 2023) along the rank axis. The logic lives in `mixin.py` (`DynamicRankMixin`, which works over
any transformers `Trainer`); see `truncation.py` for the truncation mechanism.

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

from trl import SFTTrainer

from .._dtensor_casts import finish_dtensor_casts
from .config import DynamicRankConfig
from .mixin import RANK_STATE_NAME, DynamicRankMixin


__all__ = ["RANK_STATE_NAME", "DynamicRankTrainer"]  # RANK_STATE_NAME: defined in mixin.py, importable here as before


class DynamicRankTrainer(DynamicRankMixin, SFTTrainer):
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
        # Arguments: a DynamicRankConfig (the mixin reads its dynamic-rank fields from it)
        if args is None:
            args = DynamicRankConfig("dynamic-rank-output")
        if not isinstance(args, DynamicRankConfig):
            raise TypeError(f"`args` must be a DynamicRankConfig; got {type(args).__name__}.")
        super().__init__(model, args, *positional, **kwargs)
        finish_dtensor_casts(self.model)  # trl's bf16 cast of a quantized model's factors misses FSDP2's shards
