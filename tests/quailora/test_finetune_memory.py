"""The QLoRA fine-tuning memory formula (`quailora/finetune_memory.py`): its terms against a real peft model, its
options, and its checks. The formula against measured peaks is `bench/bench_finetune_memory.py` (too slow here)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from hf_quailora.quailora.finetune_memory import estimate_finetune_memory


def test_lora_terms_match_a_real_adapter(tiny_model_path):
    config = AutoConfig.from_pretrained(tiny_model_path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                           LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    terms = estimate_finetune_memory(config, batch_size=2, max_length=16, rank=4, optimizer="adamw_torch")
    assert terms.lora_parameters == terms.lora_gradients == trainable * 4
    assert terms.optimizer_states == trainable * 8  # exp_avg and exp_avg_sq in float32
    checkpoints = config.num_hidden_layers * 2 * 16 * config.hidden_size * 2
    assert terms.checkpoints == checkpoints
    expected = terms.lora_gradients + terms.optimizer_states + max(
        checkpoints + max(terms.block_recompute, terms.lm_head), terms.optimizer_step)
    assert terms.training_extra == expected and terms.peak == terms.model_4bit + terms.lora_parameters + expected


def test_options_order_the_terms(tiny_model_path):
    config = AutoConfig.from_pretrained(tiny_model_path)
    config.vocab_size = 32000

    def terms(**options):
        return estimate_finetune_memory(config, **{"batch_size": 4, "max_length": 512, **options})

    assert terms(optimizer="paged_adamw_8bit").optimizer_states < terms(optimizer="adamw_torch").optimizer_states / 3
    triton = terms(lm_head="fused_triton").lm_head
    assert triton < terms(lm_head="fused_torch").lm_head and triton < terms(lm_head="logits").lm_head
    assert terms(eager_attention=True).block_recompute > terms().block_recompute
    assert terms(activation_bytes=4).checkpoints == 2 * terms().checkpoints
    assert terms(batch_size=8).activations > terms().activations


@pytest.mark.parametrize(
    "options, match",
    [({"optimizer": "sgd"}, "optimizer"), ({"lm_head": "chunked"}, "lm_head"), ({"batch_size": 0}, "batch_size"),
     ({"activation_bytes": 3}, "activation_bytes")],
)
def test_bad_options_are_refused(tiny_model_path, options, match):
    with pytest.raises(ValueError, match=match):
        estimate_finetune_memory(AutoConfig.from_pretrained(tiny_model_path), **options)


def test_placed_peak_drops_what_leaves_the_gpu(tiny_model_path):
    from hf_quailora.quailora.memory import estimate_init_memory

    init = estimate_init_memory(AutoConfig.from_pretrained(tiny_model_path), num_samples=16, max_length=64)
    assert init.placed_peak() == init.streamed_peak
    assert init.placed_peak(solve_on_cpu=True) <= init.streamed_peak
    assert init.placed_peak(True, True) < init.placed_peak(solve_on_cpu=True)
    assert torch.tensor(init.gram_product_blocked) <= init.gram_product
