"""FSDP1 (`FullyShardedDataParallel`, `use_orig_params=True`) outside `forward`: the adapter's tensors gathered whole,
with peft's names, and written as a peft adapter folder.

peft's `get_peft_model_state_dict` picks the adapter's entries by walking the model's modules, whose names under
FSDP1 hold `_fsdp_wrapped_module.` parts that the full state dict's names do not, so it finds none; the entries are
picked here by name instead. Only LoRA factors are supported: other trainable tensors (`modules_to_save`) are
refused, naming FSDP2 (`fully_shard`), where they are saved.

Example:

```python
state = fsdp1_adapter_state(trainer.model, "default")  # on every process: a collective
run_on_main_process(lambda: write_fsdp1_adapter(trainer.model, state, "out/adapter"))
```
"""

from __future__ import annotations

import copy
import os

import torch

from .._dist_utils import full_trainable_state_dict, unwrap_fsdp1, unwrapped_name


def fsdp1_adapter_state(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA factors of adapter `adapter_name`, gathered whole on every process, named as peft saves them
    (`...q_proj.lora_A.weight`).

    Args:
        model (`torch.nn.Module`): the FSDP1 root around a `PeftModel`, or a `PeftModel` holding FSDP1 modules.
        adapter_name (`str`, defaults to `"default"`).

    Returns:
        `dict[str, torch.Tensor]`: the factors, whole, on every process.

    Raises:
        ValueError: the adapter trains other tensors than LoRA factors (`modules_to_save`).

    Example:

    ```python
    state = fsdp1_adapter_state(wrapped_model)  # every process calls it
    ```
    """
    full = full_trainable_state_dict(model)  # a collective: gathered before anything may raise
    marker = f".{adapter_name}."
    trainable = {unwrapped_name(name) for name, p in model.named_parameters() if p.requires_grad}
    others = [key for key in full if "lora_" not in key and key in trainable]  # not the quantized base's statistics
    if others:
        raise ValueError(
            f"Under FSDP1 only LoRA factors can be gathered for saving; {len(others)} other trainable tensors "
            f"(e.g. {others[0]}) are not. Drop `modules_to_save`, or shard with FSDP2 (`fully_shard`), where they are "
            "saved."
        )
    return {key.replace(marker, ".", 1): value for key, value in full.items() if marker in key}


def write_fsdp1_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: str,
                        adapter_name: str = "default") -> None:
    """Write `state` (from `fsdp1_adapter_state`) and the adapter's config into `folder`, as `save_pretrained`
    would: `adapter_config.json` (with `inference_mode=True`) and `adapter_model.safetensors`."""
    from safetensors.torch import save_file

    config = copy.deepcopy(unwrap_fsdp1(model).peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "adapter_model.safetensors"),
              metadata={"format": "pt"})
