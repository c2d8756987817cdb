"""Truncation of LoRA factors wrapped in another module, as FSDP1 wraps each factor (`FullyShardedDataParallel`
holding the `nn.Linear` as `.module`): `use_rank` truncates the innermost `nn.Linear`."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from hf_quailora import use_rank


class _Wrapper(torch.nn.Module):
    """Stands for FSDP1's per-factor wrapper: the factor as `.module`, its forward and attributes reached through."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)  # as FullyShardedDataParallel.__getattr__ does

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_use_rank_truncates_the_linear_inside_a_wrapped_factor(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    ids = torch.tensor([[3, 5, 7, 11, 13, 17]])
    with torch.no_grad(), use_rank(model, 3, rank_scaling="per_rank"):
        expected = model(input_ids=ids).logits
    full = model(input_ids=ids).logits.detach()
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            module.lora_A["default"] = _Wrapper(module.lora_A["default"])
            module.lora_B["default"] = _Wrapper(module.lora_B["default"])
    with torch.no_grad(), use_rank(model, 3, rank_scaling="per_rank"):
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), full, rtol=0, atol=0)  # restored on exit
    assert not torch.allclose(full, expected)
