"""`W` for every layer whatever transformers did to the checkpoint's keys: renamed (EXAONE), fused and split at load
time (HRM's `gate_up_proj` and `gqkv_proj`), or renamed by a model's `_checkpoint_conversion_mapping`; a layer no
key gives keeps its clear error."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_quailora import QuAILoRAConfig, quailora_init
from hf_quailora._peft_utils import find_lora_layers
from hf_quailora.quailora.weights import FullPrecisionWeights
from hf_quailora.quantization import load_quantized_model

from testing_utils import one_thread, require_bitsandbytes, snapshot  # noqa: F401 (autouse fixture)


pytestmark = require_bitsandbytes


@pytest.fixture(scope="module")
def hrm_path(tmp_path_factory, tiny_model_path):
    """A tiny HRM text model: its checkpoint fuses `mlp.gate_up_proj` and `attn.gqkv_proj`, which transformers
    cuts into `gate_proj`/`up_proj` and `gate_proj`/`q_proj`/`k_proj`/`v_proj` modules while loading."""
    from transformers import HrmTextConfig, HrmTextForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = HrmTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, num_layers_per_stack=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-hrm")
    HrmTextForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", ["exaone", "hrm"])
def test_every_layer_finds_w_through_the_models_conversion_mapping(family, family_path, hrm_path):
    path = hrm_path if family == "hrm" else family_path(family)
    checkpoint_keys = set(load_file(f"{path}/model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()  # transformers' own W
    model, _ = load_quantized_model(path, "nf4")
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    layers = find_lora_layers(model)
    by_suffix = FullPrecisionWeights.from_any(path)
    mapped = FullPrecisionWeights.from_any(path).use_key_mapping(model)
    renamed = [name for name in layers if f"{name.removeprefix('base_model.model.')}.weight" not in checkpoint_keys]
    assert len(renamed) >= len(layers) // 2  # EXAONE: every layer; HRM: all but o_proj and down_proj
    assert all(by_suffix.shape(name) is None for name in renamed)  # suffix matching alone finds none of them
    for name in layers:
        key = f"{name.removeprefix('base_model.model.')}.weight"
        assert mapped.shape(name) == tuple(loaded[key].shape), name
        torch.testing.assert_close(mapped.get(name), loaded[key], rtol=0, atol=0, msg=name)


def test_a_layer_no_key_gives_keeps_its_clear_error(family_path, tiny_texts):
    path = family_path("exaone")
    model, tokenizer = load_quantized_model(path, "nf4")
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    checkpoint = load_file(f"{path}/model.safetensors")  # EXAONE's own keys: transformer.h.1.mlp.c_fc_1 = up_proj
    missing = {key: value for key, value in checkpoint.items() if "h.1.mlp.c_fc_1" not in key}
    message = r"model\.layers\.1\.mlp\.up_proj: no full-precision weight in a state dict .*conversion mapping"
    with pytest.raises(ValueError, match=message):
        quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False), tokenizer=tokenizer,
                      full_precision_weights=missing)
    assert not forwards
    quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False), tokenizer=tokenizer,
                  full_precision_weights=checkpoint)  # the whole checkpoint, renamed keys and all, resolves


def test_a_checkpoint_conversion_mapping_attribute_renames_keys(tiny_model_path, tiny_texts):
    """transformers 4.5x models declared `_checkpoint_conversion_mapping = {checkpoint regex: model name}`."""
    state_dict = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    renamed = {key.replace("model.layers.", "decoder.blocks."): value for key, value in state_dict.items()}
    factors = []
    for source, mapping in ((state_dict, None), (renamed, {r"^decoder\.blocks\.": "model.layers."})):
        model, tokenizer = load_quantized_model(tiny_model_path, "nf4")
        if mapping is not None:
            model._checkpoint_conversion_mapping = mapping
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
        quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False), tokenizer=tokenizer,
                      full_precision_weights=source)
        factors.append(snapshot(model))
    assert factors[0].keys() == factors[1].keys()
    for name, value in factors[0].items():
        torch.testing.assert_close(factors[1][name], value, rtol=0, atol=0, msg=name)
