"""What a family cannot do is said by name, before any work: Falcon's unquantized `FalconLinear`, and a
mixture-of-experts model's router and fused 3-D experts under peft's `"all-linear"`."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from hf_quailora import QuAILoRAConfig, quailora_init, use_rank
from hf_quailora.quantization import load_quantized_model, make_bnb_config

from testing_utils import make_trainer, one_thread, require_bitsandbytes  # noqa: F401 (autouse fixture)


pytestmark = require_bitsandbytes


def count_forwards(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_falcon_is_refused_by_name(family_path, tiny_texts):
    path = family_path("falcon")
    with pytest.raises(ValueError, match=r"quantized no layer of FalconForCausalLM: FalconLinear is a subclass of "
                                         r"nn\.Linear.*exactly nn\.Linear.*quantization='none'"):
        load_quantized_model(path, "nf4")
    # Loaded by hand with a BitsAndBytesConfig, as a user would: nothing is quantized, and QuAILoRA says why.
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=make_bnb_config("nf4"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    forwards = count_forwards(model)
    ids = torch.randint(4, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"E = 0\)\. The base of transformer\.h\.0\.self_attention\.query_key_value: "
                                         r"FalconLinear is a subclass of nn\.Linear"):
        quailora_init(model, ids, QuAILoRAConfig(show_progress=False))
    assert not forwards


@pytest.fixture(scope="module")
def moe_all_linear(family_path):
    """Mixtral in NF4 with LoRA on "all-linear": peft adds the routers and the fused experts (`target_parameters`)."""
    model, tokenizer = load_quantized_model(family_path("mixtral"), "nf4")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    return model, tokenizer


def test_moe_router_and_fused_experts_are_skipped_by_name(moe_all_linear):
    model, _ = moe_all_linear
    ids = torch.randint(4, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    report = quailora_init(model, ids, QuAILoRAConfig(show_progress=False))
    assert len(report.layers) == 8  # q, k, v, o of both blocks: the only layers bitsandbytes quantized
    experts = report.skipped["base_model.model.model.layers.0.mlp.experts.base_layer"]
    assert "MixtralExperts.gate_up_proj is a fused 3-D expert parameter (4, 256, 64)" in experts
    assert "MixtralExperts.down_proj is a fused 3-D expert parameter" in report.skipped[
        "base_model.model.model.layers.0.mlp.experts"]
    assert "MixtralTopKRouter.weight" in report.skipped["base_model.model.model.layers.1.mlp.gate"]


def test_moe_dynamic_rank_refuses_parameter_targets_by_name_before_any_forward(moe_all_linear, tiny_texts,
                                                                               tmp_path):
    model, tokenizer = moe_all_linear
    forwards = count_forwards(model)
    message = (r"model\.layers\.0\.mlp\.gate \(MixtralTopKRouter\.weight\), model\.layers\.0\.mlp\.experts "
               r"\(MixtralExperts\.down_proj\).*\(6 in all\).*LoraConfig\(target_modules=\['k_proj', 'o_proj', "
               r"'q_proj', 'v_proj'\]\)")
    with pytest.raises(ValueError, match=message):
        with use_rank(model, 2, update_rule="frozen"):
            pass
    with pytest.raises(ValueError, match=message):
        make_trainer(None, tiny_texts, tmp_path, model=(model, tokenizer), max_steps=1)
    assert not forwards
