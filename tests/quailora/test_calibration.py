"""Gram matrices: padding excluded, shared inputs shared, bad calibration data rejected."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_quailora import find_lora_layers, quailora_init
from hf_quailora.quailora.calibration import (
    collect_gram_matrices,
    full_float32_matmul,
    make_calibration_batches,
    skip_logits,
)

from testing_utils import TINY_DISTINCT_INPUTS, make_model, require_bitsandbytes, snapshot


@pytest.fixture
def tiny_lora(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_path)


def test_padding_is_excluded_and_shared_inputs_share(tiny_lora, tiny_texts):
    model, tokenizer = tiny_lora
    layers = find_lora_layers(model)
    texts = tiny_texts[:3]
    padded = make_calibration_batches(texts, tokenizer, num_samples=None, max_length=64, batch_size=3)
    assert padded[0]["attention_mask"].min() == 0, "the test needs texts of different lengths"
    stats = collect_gram_matrices(model, padded, layers, show_progress=False)

    # Independent reference: each text alone (no padding at all), inputs recorded by plain hooks.
    reference: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in layers.items():
        def hook(mod, args, out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            reference[name] = reference.get(name, 0) + x.T @ x
        handles.append(module.register_forward_hook(hook))
    tokens = 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            tokens += ids.numel()
            model(input_ids=ids)
    for handle in handles:
        handle.remove()

    assert stats.num_tokens == tokens
    for name in layers:
        torch.testing.assert_close(stats.for_layer(name).double(), reference[name], rtol=1e-4, atol=1e-3)
    # q/k/v read one tensor, gate/up another: one matrix each
    prefix = "base_model.model.model.layers.0."
    assert stats.groups[prefix + "self_attn.k_proj"] == stats.groups[prefix + "self_attn.q_proj"]
    assert stats.groups[prefix + "self_attn.v_proj"] == stats.groups[prefix + "self_attn.q_proj"]
    assert stats.groups[prefix + "mlp.up_proj"] == stats.groups[prefix + "mlp.gate_proj"]
    assert stats.groups[prefix + "self_attn.o_proj"] == prefix + "self_attn.o_proj"
    assert len(stats.matrices) == TINY_DISTINCT_INPUTS


def test_calibration_inputs_of_every_kind(tiny_lora, tiny_texts):
    model, tokenizer = tiny_lora
    import datasets

    ids = torch.randint(0, len(tokenizer), (5, 12))
    assert sum(b["input_ids"].shape[0] for b in make_calibration_batches(ids, num_samples=4, batch_size=3)) == 4
    dataset = datasets.Dataset.from_dict({"text": tiny_texts})
    batches = make_calibration_batches(dataset, tokenizer, num_samples=6, max_length=8, batch_size=4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    assert max(b["input_ids"].shape[1] for b in batches) <= 8
    loader = [{"input_ids": ids[:2], "attention_mask": torch.ones(2, 12)}, {"input_ids": ids[2:]}]
    assert sum(b["input_ids"].shape[0] for b in make_calibration_batches(loader, num_samples=3)) == 3


def test_bad_calibration_data(tiny_lora):
    model, tokenizer = tiny_lora
    with pytest.raises(ValueError, match="empty"):
        make_calibration_batches([], tokenizer)
    with pytest.raises(ValueError, match="empty"):
        make_calibration_batches(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no non-padding tokens"):
        make_calibration_batches([{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4)}])
    with pytest.raises(TypeError, match="list of texts"):
        make_calibration_batches("just one string", tokenizer)
    with pytest.raises(ValueError, match="needs a `tokenizer`"):
        make_calibration_batches(["some text"], None)
    with pytest.raises(ValueError, match="num_samples"):
        make_calibration_batches(["some text"], tokenizer, num_samples=0)


def test_logits_are_skipped_unless_the_output_head_is_calibrated(tiny_model_path, tiny_texts):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    layers = find_lora_layers(model)
    head = next(name for name in layers if name.endswith("lm_head"))
    blocks_only = {name: module for name, module in layers.items() if name != head}
    assert skip_logits(model, blocks_only) == {"logits_to_keep": 1}
    assert skip_logits(model, layers) == {}

    # The head's input is still every non-padding position: the final hidden states, checked independently.
    batches = make_calibration_batches(tiny_texts[:3], tokenizer, num_samples=None, max_length=32, batch_size=3)
    stats = collect_gram_matrices(model, batches, layers, show_progress=False)
    with torch.no_grad(), model.disable_adapter():
        hidden = model(**batches[0], output_hidden_states=True).hidden_states[-1]
    rows = hidden.reshape(-1, hidden.shape[-1])[batches[0]["attention_mask"].reshape(-1).bool()].double()
    torch.testing.assert_close(stats.for_layer(head).double(), rows.T @ rows, rtol=1e-4, atol=1e-4)  # float32


def test_a_float_tensor_as_calibration_data_is_refused_with_a_type_error(tiny_lora):
    with pytest.raises(TypeError, match="must be integer token ids .* got a torch.float32 tensor"):
        make_calibration_batches(torch.rand(2, 8))


@require_bitsandbytes
def test_token_ids_beyond_the_vocabulary_are_refused_before_any_forward(tiny_model_path):
    model, tokenizer = make_model(tiny_model_path, "nf4")
    before = snapshot(model)
    ids = torch.full((2, 8), len(tokenizer) + 5)
    with pytest.raises(ValueError, match=f"token id {len(tokenizer) + 5}, beyond the model's vocabulary of"):
        quailora_init(model, ids)
    with pytest.raises(ValueError, match="negative token id -1"):
        quailora_init(model, torch.full((2, 8), -1))
    for name, value in snapshot(model).items():
        torch.testing.assert_close(value, before[name], msg=name)



def test_gram_products_are_full_float32_even_under_tf32_settings(tiny_lora, tiny_texts):
    model, tokenizer = tiny_lora
    layers = find_lora_layers(model)
    batches = make_calibration_batches(tiny_texts[:3], tokenizer, num_samples=None, max_length=32, batch_size=3)
    reference = collect_gram_matrices(model, batches, layers, dtype=torch.float64, show_progress=False)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # what `tf32=True` or a user's own setting leaves behind
    try:
        with full_float32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        stats = collect_gram_matrices(model, batches, layers, show_progress=False)
        assert torch.get_float32_matmul_precision() == "medium"  # the caller's setting is restored
    finally:
        torch.set_float32_matmul_precision(previous)
    for name in layers:
        assert stats.for_layer(name).dtype == torch.float32  # the default accumulation dtype
        torch.testing.assert_close(stats.for_layer(name).double(), reference.for_layer(name), rtol=1e-5, atol=1e-4)
