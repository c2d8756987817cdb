"""What the recipes share, as trl's `trl/scripts/utils.py`: argument dataclasses, their parser, model loading, data.

| module | holds |
|---|---|
| `args` | the dataclasses (`RecipeModelConfig`, `RecipeDataArguments`, `RecipeQuAILoRAConfig`, `RecipeArguments`) |
| `parser` | `RecipeParser`: trl's `TrlParser` taking the renamed flags of `RENAMED_FLAGS`, with a FutureWarning |
| `models` | `load_recipe_model` and the dtype / quantization / LoRA configs a `RecipeModelConfig` describes |
| `sft_data` | training data in any `SFTTrainer` format, checked before the model loads |
"""

from .args import (
    RecipeArguments,
    RecipeDataArguments,
    RecipeModelConfig,
    RecipeQuAILoRAConfig,
    check_recipe_arguments,
)
from .models import build_lora_config, build_quantization_config, load_recipe_model, resolve_dtype
from .parser import RENAMED_FLAGS, RecipeParser, rename_flags
from .sft_data import detect_sft_format, is_conversational_dataset, load_sft_splits


__all__ = [
    "RENAMED_FLAGS",
    "RecipeArguments",
    "RecipeDataArguments",
    "RecipeModelConfig",
    "RecipeParser",
    "RecipeQuAILoRAConfig",
    "build_lora_config",
    "build_quantization_config",
    "check_recipe_arguments",
    "detect_sft_format",
    "is_conversational_dataset",
    "load_recipe_model",
    "load_sft_splits",
    "rename_flags",
    "resolve_dtype",
]
