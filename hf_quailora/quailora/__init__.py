"""A better start: QuAILoRA's quantization-aware, calibrated initialisation of LoRA (Lawton et al., 2024).

| module | holds |
|---|---|
| `config` | `QuAILoRAConfig` |
| `calibration` | calibration batches, padding-masked Gram matrices `H = XᵀX` from forward hooks |
| `weights` | `FullPrecisionWeights`: W streamed from a checkpoint or taken from a state dict |
| `solvers` | pure tensor math: closed form, ALS, SVD start, component sorting (torch only) |
| `init` | `quailora_init`: plan → calibrate → solve → write |
| `report` | `QuAILoRAReport`, `LayerReport` |
| `callback` | `QuAILoRAInitCallback`, for any Trainer |
"""

from .callback import QuAILoRAInitCallback
from .config import QuAILoRAConfig
from .init import quailora_init
from .report import LayerReport, QuAILoRAReport


__all__ = ["LayerReport", "QuAILoRAConfig", "QuAILoRAInitCallback", "QuAILoRAReport", "quailora_init"]
