"""Dynamic-rank adapters on disk: export one rank as a plain peft adapter, and load a saved adapter back.

`export_rank` writes rank b as an ordinary LoRA (`r = b`, `lora_alpha` chosen so that peft's scaling equals the
trained one) that vanilla `PeftModel.from_pretrained` reproduces. `load_dynamic_rank_adapter` is the one loader
that the lm-eval model `hf-dynrank` and the `hf-quailora` command line share: it reads `dynamic_rank.json`, loads
the base the adapter was trained on, and records the adapter's scaling on the model.

Example:

```python
from hf_quailora import export_rank
from hf_quailora.dynamic_rank.export import load_dynamic_rank_adapter

export_rank(trainer.model, 4, "out/rank-4", rank_scaling="constant")
loaded = load_dynamic_rank_adapter("smollm2-135m", "out/adapter")  # base in the quantization it was trained on
```
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from typing import NamedTuple

from torch import nn

from .._peft_utils import adapter_facts, record_adapter_facts
from .spec import (
    DEFAULT_UPDATE_RULE,
    METADATA_FILE,
    DynamicRankMetadata,
    RankScaling,
    check_choice,
    rank_scaling_for,
    resolve_rank_scaling,
)
from .truncation import _renamed_scaling, checked_rank_layers, lora_rank_of


logger = logging.getLogger(__name__)


def _export_alphas(layers: dict, adapter_name: str, b: int, rank_scaling: str) -> tuple[float, dict]:
    """peft's scaling at r=b is `lora_alpha / b` (or `/ √b`): the `lora_alpha` (and per-layer `alpha_pattern`)
    that reproduce the trained scaling at rank b."""
    use_rslora = rank_scaling == "rslora"
    alphas = {
        name: rank_scaling_for(layer, adapter_name, b, rank_scaling) * (math.sqrt(b) if use_rslora else b)
        for name, layer in layers.items()
    }
    values = list(alphas.values())
    default_alpha = max(set(values), key=values.count)
    if float(default_alpha).is_integer():
        default_alpha = int(default_alpha)
    prefix = "base_model.model."
    alpha_pattern = {
        re.escape(name[len(prefix) :] if name.startswith(prefix) else name): alpha
        for name, alpha in alphas.items()
        if not math.isclose(alpha, default_alpha, rel_tol=0, abs_tol=0)
    }
    return default_alpha, alpha_pattern


def _sliced_state(model, layers: dict, adapter_name: str, b: int) -> dict:
    """The adapter's state dict with every LoRA factor cut to its first b components (other tensors unchanged)."""
    from peft.utils import get_peft_model_state_dict

    sliced = {}
    for key, tensor in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        if key.endswith(".lora_A.weight") and key[: -len(".lora_A.weight")] in layers:
            tensor = tensor[:b]
        elif key.endswith(".lora_B.weight") and key[: -len(".lora_B.weight")] in layers:
            tensor = tensor[:, :b]
        sliced[key] = tensor.detach().contiguous().clone()
    return sliced


def export_rank(
    model: nn.Module,
    b: int,
    output_dir: str,
    rank_scaling: RankScaling | None = None,
    adapter_name: str = "default",
    *,
    scaling: str | None = None,
) -> str:
    """Save rank `b` of a dynamic-rank adapter as an ordinary peft LoRA adapter with `r = b`.

    The factors are `A[:b]`, `B[:, :b]`; `lora_alpha` is chosen so that peft's scaling (`lora_alpha / b`, or
    `lora_alpha / √b` with rsLoRA) equals the trained scaling at b. Vanilla
    `PeftModel.from_pretrained(base, output_dir)` loads it and reproduces `use_rank(model, b, rank_scaling=...)`.
    Other trainable modules of the adapter (`modules_to_save`) are saved unchanged. Layers whose trained scaling
    differs from the most common one get an `alpha_pattern` entry (their full module name). `dynamic_rank.json` is
    written beside it (`DynamicRankMetadata`, with the base quantization and `exported_rank = b`).

    Args:
        model (`PeftModel`): the trained dynamic-rank model.
        b (`int`): the rank to export, `1 ≤ b ≤ r`.
        output_dir (`str`): folder to write `adapter_config.json` and `adapter_model.safetensors` into.
        rank_scaling (`str`, *optional*): the `rank_scaling` the adapter was trained with; defaults as in `use_rank`.
        adapter_name (`str`, defaults to `"default"`).
        scaling (`str`, *optional*): deprecated name of `rank_scaling`.

    Returns:
        `str`: `output_dir`.

    Raises:
        TypeError: `model` is not a `PeftModel`.
        ValueError: `b` out of range, a bad `rank_scaling`, or no (supported) LoRA layers.

    Example:

    ```python
    export_rank(trainer.model, 4, "out/rank-4", rank_scaling=trainer.args.rank_scaling)
    model = PeftModel.from_pretrained(base_model, "out/rank-4")
    ```
    """
    from peft import PeftModel
    from safetensors.torch import save_file

    from ..quantization import base_quantization

    if not isinstance(model, PeftModel):
        raise TypeError(f"export_rank needs a peft `PeftModel`; got {type(model).__name__}.")
    rank_scaling = resolve_rank_scaling(model, _renamed_scaling(rank_scaling, scaling), adapter_name)
    layers, _ = checked_rank_layers(model, b, adapter_name, name="export rank")

    # 1. The config of a plain LoRA of rank b with the trained scaling.
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.lora_alpha, config.alpha_pattern = _export_alphas(layers, adapter_name, b, rank_scaling)
    config.r, config.rank_pattern = b, {}
    config.use_rslora = rank_scaling == "rslora"
    config.init_lora_weights, config.inference_mode = True, True

    # 2. Write the sliced factors, the config and the metadata.
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file(_sliced_state(model, layers, adapter_name, b), os.path.join(output_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    facts = adapter_facts(model, adapter_name)
    DynamicRankMetadata(
        max_rank=b, min_rank=min(facts.get("min_rank", 1), b), rank_scaling=rank_scaling,
        update_rule=facts.get("update_rule", DEFAULT_UPDATE_RULE), quantization=base_quantization(layers.values()),
        quailora=bool(facts.get("quailora", False)), exported_rank=b,
    ).save(output_dir)
    return output_dir


class LoadedAdapter(NamedTuple):
    """What `load_dynamic_rank_adapter` returns."""

    model: nn.Module
    tokenizer: object
    metadata: DynamicRankMetadata | None
    rank_scaling: str
    max_rank: int


def load_dynamic_rank_adapter(
    base,
    adapter_dir: str | os.PathLike,
    quantization: str | None = None,
    rank_scaling: str | None = None,
    adapter_name: str = "default",
    tokenizer=None,
) -> LoadedAdapter:
    """Load a base model and a saved (dynamic-rank) adapter on it, the way it was trained.

    Args:
        base (`str` or `nn.Module`): embedded name, folder or Hub id of the base; or an already loaded model.
        adapter_dir (`str`): the saved adapter (with `dynamic_rank.json` when it is dynamic-rank).
        quantization (`str`, *optional*): `"none"`, `"nf4"`, `"fp4"` or `"int8"`; defaults to the quantization
            recorded in `dynamic_rank.json` (the base the adapter was trained on), else `"none"`.
        rank_scaling (`str`, *optional*): overrides the scaling recorded in `dynamic_rank.json`.
        adapter_name (`str`, defaults to `"default"`).
        tokenizer (*optional*): used instead of the base's own tokenizer.

    Returns:
        `LoadedAdapter(model, tokenizer, metadata, rank_scaling, max_rank)`; `metadata` is `None` for an ordinary
        fixed-rank adapter (logged as a warning). The model is in eval mode and remembers its `rank_scaling`.

    Example:

    ```python
    model, tokenizer, metadata, rank_scaling, max_rank = load_dynamic_rank_adapter("smollm2-135m", "out/adapter")
    ```
    """
    from peft import PeftModel

    from ..quantization import QUANTIZATIONS, load_quantized_model

    if quantization is not None:
        check_choice("quantization", quantization, QUANTIZATIONS)
    metadata = DynamicRankMetadata.load(adapter_dir)
    if metadata is None:
        logger.warning("%s has no %s: not a dynamic-rank adapter; only its own rank is meaningful.", adapter_dir,
                       METADATA_FILE)
    if isinstance(base, (str, os.PathLike)):
        quantization = quantization or (metadata.quantization if metadata else "none")
        base, loaded_tokenizer = load_quantized_model(base, quantization)
        tokenizer = tokenizer or loaded_tokenizer
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name)
    model.eval()
    if metadata is not None:
        record_adapter_facts(model, adapter_name, rank_scaling=metadata.rank_scaling, min_rank=metadata.min_rank,
                             update_rule=metadata.update_rule, quailora=metadata.quailora)
    rank_scaling = resolve_rank_scaling(model, rank_scaling, adapter_name)
    record_adapter_facts(model, adapter_name, rank_scaling=rank_scaling)
    return LoadedAdapter(model, tokenizer, metadata, rank_scaling, lora_rank_of(model, adapter_name))


__all__ = ["LoadedAdapter", "export_rank", "load_dynamic_rank_adapter"]
