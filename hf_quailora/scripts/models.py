"""What the recipes' `RecipeModelConfig` describes, built: the dtype, the quantization and LoRA configs, the model.

The configs come from trl's own `get_quantization_config` and `get_peft_config`, as in trl's scripts.

Example:

```python
from hf_quailora.scripts import RecipeModelConfig, load_recipe_model

model, tokenizer = load_recipe_model(RecipeModelConfig(lora_r=8))  # the embedded SmolLM2 in NF4, LoRA r = 8
```
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from trl import get_peft_config, get_quantization_config

from ..quantization import load_quantized_model


if TYPE_CHECKING:
    from .args import RecipeModelConfig


def _default_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def resolve_dtype(model_args: RecipeModelConfig) -> torch.dtype | str:
    """The dtype to load with: `dtype`, or bfloat16 on a GPU and float32 on a CPU when it is unset.

    Example:

    ```python
    resolve_dtype(RecipeModelConfig(dtype="float16"))  # torch.float16
    ```
    """
    if model_args.dtype is None:
        return _default_dtype()
    return model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)


def build_quantization_config(model_args: RecipeModelConfig):
    """The `BitsAndBytesConfig` from trl's `get_quantization_config` (`None` for a full-precision base).

    Example:

    ```python
    build_quantization_config(RecipeModelConfig(quantization="fp4")).bnb_4bit_quant_type  # "fp4"
    ```
    """
    resolved, dtype = copy.copy(model_args), resolve_dtype(model_args)
    resolved.dtype = _default_dtype() if dtype == "auto" else dtype  # trl passes `dtype` as the 4-bit compute dtype
    return get_quantization_config(resolved)


def build_lora_config(model_args: RecipeModelConfig):
    """The peft `LoraConfig` from trl's `get_peft_config`.

    Example:

    ```python
    build_lora_config(RecipeModelConfig(lora_r=8)).lora_alpha  # 8: the recipes' alpha defaults to r
    ```
    """
    return get_peft_config(model_args)


def load_recipe_model(model_args: RecipeModelConfig, trust_remote_code: bool = False):
    """Load the base (quantized as asked) with `load_quantized_model` and wrap it in the LoRA of `build_lora_config`.

    Args:
        model_args (`RecipeModelConfig`): the model, its quantization and its LoRA.
        trust_remote_code (`bool`, defaults to `False`): run the model's own code from the Hub.

    Returns:
        `(peft_model, tokenizer)`.

    Example:

    ```python
    model, tokenizer = load_recipe_model(RecipeModelConfig(load_in_8bit=True, lora_target_modules=["q_proj"]))
    ```
    """
    from peft import get_peft_model

    extra = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    model, tokenizer = load_quantized_model(
        model_args.model_name_or_path, build_quantization_config(model_args) or "none",
        compute_dtype=resolve_dtype(model_args), revision=model_args.model_revision,
        trust_remote_code=trust_remote_code, **extra,
    )
    return get_peft_model(model, build_lora_config(model_args)), tokenizer
