"""Small helpers over peft and the Trainer's model wrappers, shared by both halves of the package."""

from __future__ import annotations

import torch


def find_lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.nn.Module]:
    """Named peft `LoraLayer` modules of `model` that carry `adapter_name`.

    Example:

    ```python
    layers = find_lora_layers(peft_model)  # {"base_model.model.model.layers.0.self_attn.q_proj": <Linear4bit>, …}
    ```
    """
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    }


def require_lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.nn.Module]:
    """`find_lora_layers`, raising a `ValueError` that says how to add LoRA when there is none."""
    layers = find_lora_layers(model, adapter_name)
    if not layers:
        raise ValueError(
            f"The model has no LoRA layers with adapter {adapter_name!r}; wrap it with peft's get_peft_model "
            "(e.g. LoraConfig(target_modules='all-linear')) or pass `peft_config=` to the trainer."
        )
    return layers


def common_lora_rank(layers: dict[str, torch.nn.Module], adapter_name: str = "default") -> int:
    """The largest rank every layer supports: the smallest LoRA r over `layers` (they differ with `rank_pattern`)."""
    return min(layer.r[adapter_name] for layer in layers.values())


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def active_adapter_name(model: torch.nn.Module) -> str:
    """The name of the model's active adapter (`"default"` when it has none)."""
    name = getattr(model, "active_adapter", "default")
    return name if isinstance(name, str) else name[0]


# Per-adapter facts recorded on the model object by the pieces that know them (quailora_init, the trainer, the
# adapter loader), so that later calls (use_rank, export_rank, evaluate_ranks) default to the right scaling.
_MODEL_FACTS = "_hf_quailora_adapter_facts"


def record_adapter_facts(model, adapter_name: str = "default", **facts) -> None:
    """Remember facts about an adapter on the model object (e.g. `quailora=True`, `rank_scaling="constant"`)."""
    store = model.__dict__.setdefault(_MODEL_FACTS, {})
    store.setdefault(adapter_name, {}).update(facts)


def adapter_facts(model, adapter_name: str = "default") -> dict:
    """What `record_adapter_facts` remembered about an adapter (empty when nothing was recorded)."""
    return dict(model.__dict__.get(_MODEL_FACTS, {}).get(adapter_name, {}))
