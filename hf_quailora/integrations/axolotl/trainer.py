"""`AxolotlDynamicRankTrainer`: `DynamicRankMixin` over axolotl's `AxolotlTrainer`.

axolotl's supervised builder constructs the class that `QuAILoRAPlugin.get_trainer_cls` returns as
`trainer_cls(model=..., args=AxolotlTrainingArguments(...), train_dataset=..., data_collator=..., callbacks=...,
eval_data_collator=..., bench_data_collator=..., dataset_tags=..., processing_class=...)`; the mixin passes all of
them on to `AxolotlTrainer`. Its dynamic-rank settings cannot travel in those arguments (axolotl's
`AxolotlTrainingArguments` has no such fields), so `dynamic_rank_trainer_class` binds them to a subclass.

Example:

```python
from hf_quailora import DynamicRankSettings
from hf_quailora.integrations.axolotl import dynamic_rank_trainer_class

trainer_cls = dynamic_rank_trainer_class(DynamicRankSettings(min_rank=2, eval_ranks=[2, 8]))
```
"""

from __future__ import annotations

from axolotl.core.trainers.base import AxolotlTrainer

from ...dynamic_rank.mixin import DynamicRankMixin, DynamicRankSettings


class AxolotlDynamicRankTrainer(DynamicRankMixin, AxolotlTrainer):
    """axolotl's `AxolotlTrainer` drawing one LoRA rank per optimizer step (or summing SoFT's rank set).

    Everything `DynamicRankTrainer` does (the step rule, `rank` in the logs, `evaluate()` at every rank as
    `eval_loss@r{b}`, `dynamic_rank.json` beside every saved adapter, the sampler state in checkpoints) comes from
    `DynamicRankMixin`; axolotl's own trainer features run underneath.

    Args:
        *args, **kwargs: `AxolotlTrainer`'s arguments, as axolotl's builder passes them.
        dynamic_rank (`DynamicRankSettings`, *optional*): the settings; defaults to the class's
            `dynamic_rank_settings` (bound by `dynamic_rank_trainer_class`), else `DynamicRankSettings`' defaults
            with `args.seed`.

    Raises:
        ValueError: as `DynamicRankMixin` (no LoRA layers, `max_rank` above the LoRA r, ranks out of range).

    Example: `trainer = dynamic_rank_trainer_class(settings)(model=peft_model, args=axolotl_args, ...)`.
    """

    dynamic_rank_settings: DynamicRankSettings | None = None

    def __init__(self, *args, dynamic_rank: DynamicRankSettings | None = None, **kwargs):
        if dynamic_rank is None:
            dynamic_rank = self.dynamic_rank_settings
        super().__init__(*args, dynamic_rank=dynamic_rank, **kwargs)


def dynamic_rank_trainer_class(settings: DynamicRankSettings) -> type[AxolotlDynamicRankTrainer]:
    """A subclass of `AxolotlDynamicRankTrainer` bound to `settings`, for axolotl's builder to construct.

    Args:
        settings (`DynamicRankSettings`): the dynamic-rank settings (from the `dynamic_rank:` block).

    Returns:
        `type`: the trainer class.

    Raises:
        TypeError: `settings` is not a `DynamicRankSettings`.

    Example: `dynamic_rank_trainer_class(DynamicRankSettings(update_rule="nested"))`.
    """
    if not isinstance(settings, DynamicRankSettings):
        raise TypeError(f"`settings` must be a DynamicRankSettings; got {type(settings).__name__}.")
    namespace = {"dynamic_rank_settings": settings, "__module__": __name__,
                 "__doc__": AxolotlDynamicRankTrainer.__doc__}
    return type(AxolotlDynamicRankTrainer.__name__, (AxolotlDynamicRankTrainer,), namespace)
