"""Loading a causal LM quantized by bitsandbytes, with its tokenizer: `load_quantized_model`.

The loader's choice (`LoadQuantization`: `"nf4"`, `"fp4"`, `"int8"` or `"none"`) is what `load_quantized_model`,
the CLI's `--quantization` and the recipes accept. It is not the same list as the kinds a base may be recorded with in
`dynamic_rank.json` (`hf_quailora.quantization.recorded_quantizations()`: every registered backend's kinds and
`"none"`): a model quantized by another backend is loaded by its own library and passed in as a model.

Example:

```python
from hf_quailora.quantization import load_quantized_model

model, tokenizer = load_quantized_model("smollm2-135m", quantization="nf4")
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch

from .._import_utils import is_hub_offline
from ..embedded.models import check_model_source, resolve
from .bnb import (
    bnb_quantization_kind,
    describe_bnb_config,
    disable_bnb_cpu_fast_path,
    make_bnb_config,
    why_not_quantized,
)


if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

LoadQuantization = Literal["nf4", "fp4", "int8", "none"]
LOAD_QUANTIZATIONS: tuple[str, ...] = get_args(LoadQuantization)


def load_quantized_model(
    name_or_path: str,
    quantization: LoadQuantization | BitsAndBytesConfig = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    **kwargs,
):
    """Load a causal LM (embedded name, folder or Hub id) quantized by bitsandbytes, with its tokenizer.

    Args:
        name_or_path (`str`): `"smollm2-135m"`, a local folder or a Hub id.
        quantization (`str` or `transformers.BitsAndBytesConfig`, defaults to `"nf4"`): `"nf4"`, `"fp4"`, `"int8"`,
            `"none"` (full precision), or a ready `BitsAndBytesConfig` (e.g. from trl's `get_quantization_config`),
            used as is (`double_quant` and `compute_dtype` then do not shape it).
        double_quant (`bool`, defaults to `True`): double quantization of 4-bit statistics.
        compute_dtype (`torch.dtype` or `"auto"`, *optional*): see `make_bnb_config`; also the dtype of unquantized
            weights (`"auto"`: the checkpoint's dtype; the 4-bit compute dtype then takes the device default).
        device_map (`str` or `dict`, *optional*): defaults to the current CUDA device, else `"cpu"`.
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained`; `revision` and `trust_remote_code` also go to the
            tokenizer. While the Hub is offline (`HF_HUB_OFFLINE`), `use_kernels` defaults to `False`: transformers'
            Hub kernels cannot be fetched then, and an uncached one fails the load on a GPU.

    Returns:
        `(model, tokenizer)`; the tokenizer gets a pad token (EOS) when it has none.

    Raises:
        ValueError: an unknown `quantization`; a model folder that does not exist, or a name that is not embedded,
            not a folder and not in the Hub cache while the Hub is offline; a quantization that transformers applied
            to no layer of this model (e.g. Falcon, whose `FalconLinear` layers bitsandbytes does not replace); the
            message names the layer type.

    Example:

    ```python
    model, tokenizer = load_quantized_model("smollm2-135m", quantization="int8")
    ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if not isinstance(quantization, BitsAndBytesConfig) and quantization not in LOAD_QUANTIZATIONS:
        raise ValueError(
            f"`quantization` must be one of {LOAD_QUANTIZATIONS} or a BitsAndBytesConfig; got {quantization!r}."
        )
    path = resolve(name_or_path)
    check_model_source(path)
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if isinstance(quantization, BitsAndBytesConfig):
        kwargs["quantization_config"] = quantization
    elif quantization != "none":
        bnb_dtype = None if compute_dtype == "auto" else compute_dtype
        kwargs["quantization_config"] = make_bnb_config(quantization, double_quant, bnb_dtype)
    if "use_kernels" not in kwargs and is_hub_offline():
        # transformers 5.2x swaps layers for Hub kernels (kernels-community/…) by default when `kernels` is installed;
        # offline, a kernel that is not cached fails the whole load on a GPU ("Version 2 of
        # 'kernels-community/rotary' is not available in the local cache", seen on an H200). Keep the torch layers.
        kwargs["use_kernels"] = False
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=compute_dtype, **kwargs)
    if "quantization_config" in kwargs:
        _require_quantized_layers(model, describe_bnb_config(kwargs["quantization_config"]))
    disable_bnb_cpu_fast_path(model)
    tokenizer_kwargs = {key: kwargs[key] for key in ("revision", "trust_remote_code") if key in kwargs}
    tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _require_quantized_layers(model: torch.nn.Module, quantization: str) -> None:
    """Raise when a model loaded with a bitsandbytes config holds no quantized layer at all (nothing was replaced)."""
    if any(bnb_quantization_kind(module) is not None for module in model.modules()):
        return
    linear = [module for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")]
    reason = why_not_quantized(linear[0]) if linear else "it has no linear layers"
    raise ValueError(
        f"quantization={quantization!r} was asked, but transformers quantized no layer of {type(model).__name__}: "
        f"{reason}. Load it with quantization='none' to train LoRA on the full-precision model (QuAILoRA then has no "
        "quantization error to correct), or use a model family whose linear layers are plain nn.Linear."
    )


__all__ = ["LOAD_QUANTIZATIONS", "LoadQuantization", "load_quantized_model"]
