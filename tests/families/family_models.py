"""The families of the matrix: tiny random models built from configs and saved as safetensors, so that `W` streams
from disk as it does for users (with the keys transformers writes, which for EXAONE and Mixtral differ from the
module paths)."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    """One model family of the matrix: its config, what LoRA targets, and how many LoRA layers that gives."""

    name: str
    config: str  # a transformers config class
    settings: dict
    num_lora_layers: int  # with `target_modules` on the 2-block model
    target_modules: str | list[str] = "all-linear"
    quantized: bool = True  # False: transformers' bitsandbytes integration leaves every layer in full precision


_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
_HEAD_DIM = dict(_DECODER, head_dim=16)
_SLIDING = dict(_HEAD_DIM, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
_MIXTRAL_ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]  # the linear layers; routers and experts are not

FAMILIES = [
    Family("llama", "LlamaConfig", _DECODER, 14),
    Family("mistral", "MistralConfig", dict(_DECODER, sliding_window=8), 14),
    Family("qwen2", "Qwen2Config", _DECODER, 14),
    Family("qwen3", "Qwen3Config", _HEAD_DIM, 14),
    Family("gemma2", "Gemma2Config", _SLIDING, 14),  # embedding scaling, soft-capping, sliding window, tied
    Family("gemma3", "Gemma3TextConfig", _SLIDING, 14),
    Family("phi3", "Phi3Config", _DECODER, 8),  # fused qkv_proj and gate_up_proj
    Family("gpt_neox", "GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=128), 8),
    Family("opt", "OPTConfig", dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128), 12),
    Family("bloom", "BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4), 8),
    Family("falcon", "FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4), 8,
           quantized=False),
    Family("exaone", "ExaoneConfig", _DECODER, 14),  # checkpoint keys `transformer.h.0.attn.attention.q_proj`
    Family("mixtral", "MixtralConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2), 8,
           target_modules=_MIXTRAL_ATTENTION),  # experts fused into 3-D parameters; checkpoint keeps per-expert keys
]
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}


def build_family_model(family: Family, tokenizer, folder) -> None:
    """Save a 2-block model of `family` with random weights (seed 0) and the tiny tokenizer into `folder`."""
    import transformers

    config = getattr(transformers, family.config)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **family.settings,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
