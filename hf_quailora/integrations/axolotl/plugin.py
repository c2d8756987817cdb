"""`QuAILoRAPlugin`: axolotl's `BasePlugin` for QuAILoRA initialisation and dynamic-rank training.

A thin plugin: each hook hands the library's own piece to axolotl.

- `register`: sets axolotl's unset `lora_*_kernel` options to `false` when a block is on (those fused kernels bypass
  peft's LoRA layers, which truncation and calibration need; axolotl would turn them on).
- `get_input_args`: the `quailora:` and `dynamic_rank:` blocks (`args.QuAILoRAArgs`), checked by axolotl's config
  validation.
- `add_callbacks_pre_trainer`: `QuAILoRAInitCallback`, in the callbacks axolotl passes to the trainer's constructor.
  So the trainer fires its `on_init_end` (under FSDP or DeepSpeed, which axolotl announces through
  `ACCELERATE_USE_FSDP`/`ACCELERATE_USE_DEEPSPEED`, the init runs there, before the trainer wraps the model), and
  `DynamicRankMixin` sees it and resolves `rank_scaling="constant"`. `post_trainer_create` would be too late for
  both: the trainer and its rank scaling exist by then.
- `get_trainer_cls`: `AxolotlDynamicRankTrainer` bound to the `dynamic_rank:` settings.
- `post_train`: `dynamic_rank.json` beside the adapter axolotl saves in `output_dir` (axolotl's final save calls
  peft's `save_pretrained` itself, not the trainer's, so the metadata `hf-quailora eval|export` read would be
  missing there; the trainer's checkpoints carry it already).

An adapter written by `hf-quailora init` comes in through axolotl's own `lora_model_dir` (no `quailora:` block): peft
loads it with its LoraConfig, whose facts make the trainer resolve `rank_scaling="constant"`.

Example (axolotl YAML; see docs/launchers.md):

```yaml
plugins:
  - hf_quailora.integrations.axolotl.QuAILoRAPlugin
quailora:
  calibration_samples: 64
dynamic_rank:
  eval_ranks: [1, 4, 16]
```
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref

from axolotl.integrations.base import BasePlugin

from ..._io_utils import ADAPTER_CONFIG
from ...dynamic_rank.mixin import DynamicRankMixin, DynamicRankSettings
from ...quailora.callback import QuAILoRAInitCallback
from ...quailora.config import QuAILoRAConfig
from .args import QUAILORA_KEYS, turn_off_lora_kernels


logger = logging.getLogger(__name__)


def quailora_callback(cfg) -> QuAILoRAInitCallback:
    """The `QuAILoRAInitCallback` that the `quailora:` block of axolotl's config `cfg` asks for.

    `calibration_dataset` (a name or a path) is loaded with `load_dataset_any` here, before any model work; without
    it the callback calibrates on the trainer's train batches.

    Example: `quailora_callback(cfg)` with `cfg.quailora == {"calibration_samples": 32}`.
    """
    block = dict(cfg.quailora)
    fields = {f.name for f in dataclasses.fields(QuAILoRAConfig)}
    config = QuAILoRAConfig(**{key: value for key, value in block.items() if key in fields})
    extra = {key: block[key] for key in QUAILORA_KEYS if block.get(key) is not None}
    if "calibration_dataset" in extra:
        from ...embedded.data import load_dataset_any

        extra["calibration_dataset"] = list(load_dataset_any(extra["calibration_dataset"])["text"])
    return QuAILoRAInitCallback(config=config, **extra)


def dynamic_rank_settings(cfg) -> DynamicRankSettings:
    """The `DynamicRankSettings` of the `dynamic_rank:` block of `cfg`, with axolotl's `seed` as `seed`.

    Example: `dynamic_rank_settings(cfg).eval_ranks`.
    """
    block = dict(cfg.dynamic_rank)
    if cfg.seed is not None:
        block["seed"] = cfg.seed
    return DynamicRankSettings(**block)


class QuAILoRAPlugin(BasePlugin):
    """axolotl plugin: `quailora:` initialises the LoRA factors, `dynamic_rank:` trains every rank truncation.

    Enable it in the YAML with `plugins: [hf_quailora.integrations.axolotl.QuAILoRAPlugin]`; each block is off when
    absent. Needs `adapter: lora` or `qlora`.

    Raises:
        ValueError: from axolotl's config validation, a bad block (see `args.QuAILoRAArgs`); from the trainer, the
            errors of `QuAILoRAInitCallback` and `DynamicRankMixin`.

    Example:

    ```python
    from axolotl.cli.config import load_cfg

    cfg = load_cfg("config.yml")  # with the plugin and its blocks: validated by axolotl
    ```
    """

    def __init__(self):
        super().__init__()
        self._trainer: weakref.ref | None = None  # the dynamic-rank trainer of the current run, for post_train

    def register(self, cfg) -> None:
        turned_off = turn_off_lora_kernels(cfg)
        if turned_off:
            logger.info("hf_quailora: %s set to false (fused LoRA kernels bypass peft's LoRA layers).", turned_off)

    def get_input_args(self) -> str:
        return "hf_quailora.integrations.axolotl.args.QuAILoRAArgs"

    def add_callbacks_pre_trainer(self, cfg, model) -> list:
        if cfg.quailora is None:
            return []
        return [quailora_callback(cfg)]

    def get_trainer_cls(self, cfg):
        if cfg.dynamic_rank is None:
            return None
        from .trainer import dynamic_rank_trainer_class

        return dynamic_rank_trainer_class(dynamic_rank_settings(cfg))

    def post_trainer_create(self, cfg, trainer) -> None:
        if not isinstance(trainer, DynamicRankMixin):
            self._trainer = None
            return
        self._trainer = weakref.ref(trainer)
        logger.info("hf_quailora: dynamic-rank training at rank_scaling=%r, ranks %d..%d.", trainer.rank_scaling,
                    trainer.rank_settings.min_rank, trainer.max_rank)

    def post_train(self, cfg, model) -> None:
        # axolotl calls this after `trainer.train()` and again after its own final save: write (or rewrite) the
        # metadata wherever an adapter already lies, from the main process only.
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None or not trainer.args.should_save or not cfg.output_dir:
            return
        if os.path.isfile(os.path.join(cfg.output_dir, ADAPTER_CONFIG)):
            trainer._metadata().save(cfg.output_dir)
