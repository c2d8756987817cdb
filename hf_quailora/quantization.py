"""Loading bitsandbytes-quantized models safely, on CUDA and on the CPU.

bitsandbytes' `Linear4bit` has a CPU fast path (AVX512-BF16) that repacks the weights in place the first time a
layer runs in eval mode without gradients. Afterwards gradients silently stop flowing through LoRA training,
layers whose sizes are not multiples of 32 crash, and saving can corrupt the weights (methods.md §5).
`disable_bnb_cpu_fast_path` turns it off on every such layer; every hf_quailora entry point that loads,
evaluates or initialises a 4-bit model calls it.

Example:

```python
from hf_quailora.quantization import load_quantized_model

model, tokenizer = load_quantized_model("smollm2-135m", quantization="nf4")
```
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from ._import_utils import is_bitsandbytes_available
from .models import resolve


logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")


class _OnceFilter(logging.Filter):
    """Let each distinct message through once (bitsandbytes repeats some warnings on every forward)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _quiet_repeated_bnb_warnings() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_OnceFilter())


def disable_bnb_cpu_fast_path(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' in-place CPU weight repacking on every 4-bit layer of `model`.

    Layers that were already repacked are converted back (bitsandbytes' own inverse; exact for the codes, and
    the absmax statistics are requantized when double quantization is on), with a warning.

    Args:
        model (`torch.nn.Module`): any model; layers other than `bnb.nn.Linear4bit` are left alone.

    Returns:
        `int`: the number of 4-bit layers found.

    Example:

    ```python
    disable_bnb_cpu_fast_path(model)
    ```
    """
    if not is_bitsandbytes_available():
        return 0
    import bitsandbytes as bnb

    _quiet_repeated_bnb_warnings()
    count, repacked = 0, 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
            state = module.weight.quant_state
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
                module.quant_state = module.weight.quant_state
                repacked += 1
    if repacked:
        logger.warning(
            "%d 4-bit layers had already been repacked by bitsandbytes' CPU fast path; converted them back. "
            "Call disable_bnb_cpu_fast_path() right after loading to avoid this.",
            repacked,
        )
    return count


def make_bnb_config(
    quantization: Literal["nf4", "fp4", "int8"] = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
):
    """Build a `transformers.BitsAndBytesConfig` for QLoRA-style loading.

    Args:
        quantization (`str`, defaults to `"nf4"`): `"nf4"`, `"fp4"` (4-bit, block 64) or `"int8"` (LLM.int8).
        double_quant (`bool`, defaults to `True`): quantize the 4-bit block statistics too (QLoRA's default).
        compute_dtype (`torch.dtype`, *optional*): 4-bit compute dtype; bf16 on CUDA, fp32 on the CPU by default.

    Returns:
        `transformers.BitsAndBytesConfig`.

    Raises:
        ValueError: an unknown `quantization`.
        ImportError: bitsandbytes is not installed.

    Example:

    ```python
    config = make_bnb_config("nf4")
    ```
    """
    from transformers import BitsAndBytesConfig

    if quantization not in ("nf4", "fp4", "int8"):
        raise ValueError(f"`quantization` must be one of 'nf4', 'fp4', 'int8'; got {quantization!r}.")
    if not is_bitsandbytes_available():
        raise ImportError("Quantized loading needs bitsandbytes: `pip install bitsandbytes`.")
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_quantized_model(
    name_or_path: str,
    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    **kwargs,
):
    """Load a causal LM (embedded name, folder or Hub id) quantized by bitsandbytes, with its tokenizer.

    Args:
        name_or_path (`str`): `"smollm2-135m"`, a local folder or a Hub id.
        quantization (`str`, defaults to `"nf4"`): `"nf4"`, `"fp4"`, `"int8"`, or `"none"` (full precision).
        double_quant (`bool`, defaults to `True`): double quantization of 4-bit statistics.
        compute_dtype (`torch.dtype`, *optional*): see `make_bnb_config`; also the dtype of unquantized weights.
        device_map (`str` or `dict`, *optional*): defaults to the current CUDA device, else `"cpu"`.
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained`.

    Returns:
        `(model, tokenizer)`; the tokenizer gets a pad token (EOS) when it has none.

    Example:

    ```python
    model, tokenizer = load_quantized_model("smollm2-135m", quantization="int8")
    ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"`quantization` must be one of {QUANTIZATIONS}; got {quantization!r}.")
    path = resolve(name_or_path)
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if quantization != "none":
        kwargs["quantization_config"] = make_bnb_config(quantization, double_quant, compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=compute_dtype, **kwargs)
    disable_bnb_cpu_fast_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
