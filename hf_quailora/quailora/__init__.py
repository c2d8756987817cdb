"""A better start: QuAILoRA's quantization-aware, calibrated initialisation of LoRA (Lawton et al., 2024).

| module | holds |
|---|---|
| `config` | `QuAILoRAConfig` (its calibration fields are prefixed, so trl's parser takes it beside `SFTConfig`) |
| `calibration` | calibration batches, padding-masked Gram matrices `H = XᵀX` from forward hooks |
| `weights`, `key_mapping` | `FullPrecisionWeights`: W streamed from a checkpoint (through the model's key mapping) or a state dict |
| `solvers` | pure tensor math: closed form, ALS, SVD start, component sorting (torch only) |
| `schedule` | the plan of the streamed init: which blocks are calibrated together, on which devices, checked once |
| `streaming` | the plan executed: block replay or one pass per group |
| `memory` | the estimate: the memory formula, the budget option, free memory |
| `finetune_memory` | the yardstick: the peak of a QLoRA training step, which the init should stay under |
| `placement` | where the solves run (`solve_device`), overlapped with the next group's calibration |
| `init` | `quailora_init`: plan → calibrate → solve → write |
| `report` | `QuAILoRAReport`, `LayerReport` |
| `step_ratio` | `quailora_step_ratio`: how much further an Adam step moves the product from the start than from peft's |
| `first_step` | `quailora_first_step`, `quailora_lr_scale`: how far Adam's first step moves the start's predictions, and the learning-rate rule built on it |
| `lr_rule` | `lr_scale` as the callback applies it: "auto" kept when it cannot be measured, numbers applied or refused |
| `callback` | `QuAILoRAInitCallback`, for any Trainer |

The start knows nothing of dynamic-rank training, which builds on it (never the reverse).
"""

from .callback import QuAILoRAInitCallback
from .config import QuAILoRAConfig
from .first_step import FirstStep, quailora_first_step, quailora_lr_scale
from .init import quailora_init
from .report import LayerReport, QuAILoRAReport
from .step_ratio import quailora_step_ratio


__all__ = ["FirstStep", "LayerReport", "QuAILoRAConfig", "QuAILoRAInitCallback", "QuAILoRAReport", "quailora_first_step",
           "quailora_init", "quailora_lr_scale", "quailora_step_ratio"]
