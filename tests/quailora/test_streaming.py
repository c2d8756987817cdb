"""Streamed QuAILoRA initialisation: block replay and per-group passes give today's all-at-once factors, with
bounded memory, and leave no Gram matrix, W, Q or E behind."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_quailora import QuAILoRAConfig, quailora_init
from hf_quailora.quailora.memory import estimate_init_memory, parse_memory_budget
from hf_quailora.quailora.schedule import find_decoder_blocks
from hf_quailora.quailora.streaming import record_block_inputs
from hf_quailora.quantization import load_quantized_model

from testing_utils import TINY_LINEAR_LAYERS, TINY_NUM_BLOCKS, require_bitsandbytes, snapshot, tensor_bytes


pytestmark = require_bitsandbytes

TINY_BLOCK_GRAM_BYTES = (64**2 * 6 + 128**2) * 4  # q, k, v, o, gate, up (in = 64) and down (in = 128), float32


def quantized_lora(path, r=4, targets="all-linear"):
    model, tokenizer = load_quantized_model(path, "nf4")
    torch.manual_seed(0)  # the same random A for every model of a comparison
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0)), tokenizer


def init_factors(path, texts, **settings):
    model, tokenizer = quantized_lora(path)
    config = QuAILoRAConfig(show_progress=False, calibration_samples=12, calibration_batch_size=5,
                            calibration_length=24, **settings)
    report = quailora_init(model, texts, config, tokenizer=tokenizer)
    return snapshot(model), report


def assert_same_factors(result, reference):
    assert result.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(result[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def all_at_once(tiny_model_path, tiny_texts):
    return init_factors(tiny_model_path, tiny_texts, streaming="off")


@pytest.mark.parametrize(
    "settings",
    [
        {"streaming": "replay"},
        {"streaming": "passes", "memory_budget": str(TINY_BLOCK_GRAM_BYTES)},  # one pass per block
        {"streaming": "auto", "gram_device": "cpu", "gram_dtype": "float64"},
    ],
    ids=["replay", "passes", "auto-cpu"],
)
def test_streamed_factors_equal_the_all_at_once_factors(tiny_model_path, tiny_texts, all_at_once, settings):
    reference, reference_report = all_at_once
    factors, report = init_factors(tiny_model_path, tiny_texts, **settings)
    assert reference_report.streaming == "off"
    assert report.streaming == (settings["streaming"] if settings["streaming"] != "auto" else "replay")
    assert len(report.layers) == TINY_LINEAR_LAYERS
    assert [layer.name for layer in report.layers] == [layer.name for layer in reference_report.layers]
    assert report.num_tokens == reference_report.num_tokens
    assert_same_factors(factors, reference)


def test_the_budget_groups_blocks_and_a_budget_below_one_block_fails_before_any_forward(tiny_model_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_model_path)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    config = QuAILoRAConfig(show_progress=False, calibration_samples=4, streaming="passes",
                            memory_budget=TINY_BLOCK_GRAM_BYTES - 1)
    message = rf"cannot stream even one block: .*layers\.\d+ needs .*\({TINY_BLOCK_GRAM_BYTES} bytes\).*memory_budget"
    with pytest.raises(ValueError, match=message):
        quailora_init(model, tiny_texts, config, tokenizer=tokenizer)
    assert not forwards
    two_blocks = QuAILoRAConfig(show_progress=False, calibration_samples=4, streaming="passes",
                                memory_budget=TINY_BLOCK_GRAM_BYTES * TINY_NUM_BLOCKS)
    quailora_init(model, tiny_texts, two_blocks, tokenizer=tokenizer)
    assert len(forwards) == 1  # both blocks in one group: one pass (4 samples, one batch)


def test_auto_refuses_when_one_block_does_not_fit_in_free_memory(tiny_model_path, tiny_texts, monkeypatch):
    import hf_quailora.quailora.schedule as schedule

    model, tokenizer = quantized_lora(tiny_model_path)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    # The machine's free memory is the input here; pretend the Gram device has less than one block's matrices.
    monkeypatch.setattr(schedule, "free_memory", lambda device: TINY_BLOCK_GRAM_BYTES - 1)
    for mode in ("replay", "passes"):
        config = QuAILoRAConfig(show_progress=False, calibration_samples=4, streaming=mode)
        with pytest.raises(ValueError, match=r"cannot stream even one block: .*layers\.\d+ needs .* free memory of"):
            quailora_init(model, tiny_texts, config, tokenizer=tokenizer)
    assert not forwards
    monkeypatch.setattr(schedule, "free_memory", lambda device: TINY_BLOCK_GRAM_BYTES)
    quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False, calibration_samples=4), tokenizer=tokenizer)
    assert forwards


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"memory_budget": 0}, ValueError, "positive, finite"),
        ({"memory_budget": -5}, ValueError, "positive, finite"),
        ({"memory_budget": float("nan")}, ValueError, "positive, finite"),
        ({"memory_budget": "inf"}, ValueError, "positive, finite"),
        ({"memory_budget": "8 parsecs"}, ValueError, "a number with a unit"),
        ({"memory_budget": True}, TypeError, "memory_budget"),
        ({"gram_device": "gpu0"}, ValueError, "gram_device"),
        ({"streaming": "sideways"}, ValueError, "streaming"),
    ],
)
def test_bad_memory_settings_are_rejected_by_the_config(settings, error, message):
    with pytest.raises(error, match=message):
        QuAILoRAConfig(**settings)


def test_memory_budget_units():
    assert parse_memory_budget("auto") is None
    assert parse_memory_budget("8GiB") == 8 * 2**30
    assert parse_memory_budget("500 MB") == 500 * 10**6
    assert parse_memory_budget(1234) == 1234
    assert parse_memory_budget("1e9") == 10**9


@pytest.mark.parametrize("streaming", ["replay", "off"])
def test_nothing_is_left_behind_unless_asked(tiny_model_path, tiny_texts, streaming):
    model, tokenizer = quantized_lora(tiny_model_path)
    before = tensor_bytes()
    kept = torch.zeros(3, dtype=torch.float64)  # the accounting sees the tensors that are alive
    assert tensor_bytes() == before + kept.numel() * 8
    del kept
    report = quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False, streaming=streaming),
                           tokenizer=tokenizer)
    assert report.gram_statistics is None
    assert tensor_bytes() == before
    report = quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False, streaming=streaming,
                                                             keep_gram_statistics=True), tokenizer=tokenizer)
    stats = report.gram_statistics
    assert len(stats.groups) == TINY_LINEAR_LAYERS and stats.num_tokens == report.num_tokens
    kept_bytes = sum(matrix.numel() * matrix.element_size() for matrix in stats.matrices.values())
    assert all(matrix.dtype == torch.float32 for matrix in stats.matrices.values())  # the default gram_dtype
    assert tensor_bytes() - before == kept_bytes
    again = quailora_init(model, stats, QuAILoRAConfig(show_progress=False, solver="closed_form"))
    assert again.num_tokens == report.num_tokens  # the kept statistics initialise again without calibration
    # The README's formula counts exactly these Gram bytes (all linear layers adapted, Llama-shaped).
    terms = estimate_init_memory(model.config)
    assert terms.gram_all_blocks == kept_bytes == model.config.num_hidden_layers * terms.gram_per_block


def test_svd_baseline_is_optional(tiny_model_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_model_path)
    cheap = quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False), tokenizer=tokenizer)
    assert all(layer.calibrated_error_svd is None and layer.frobenius_error_svd is None for layer in cheap.layers)
    assert "SVD start" not in cheap.summary() and "n/a" in cheap.to_markdown()
    full = quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False, report_svd_baseline=True),
                         tokenizer=tokenizer)
    assert all(layer.calibrated_error_svd > layer.calibrated_error_result for layer in full.layers)
    assert "SVD start" in full.summary()


@pytest.fixture(scope="module")
def tiny_gemma3_path(tmp_path_factory, tiny_model_path):
    """A 4-block Gemma 3 text model alternating sliding-window (window 4) and full attention layers."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gemma3")
    Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_replay_gives_each_block_its_own_arguments_sliding_window(tiny_gemma3_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_gemma3_path)
    names = [name for name, _ in model.named_modules() if name.endswith("q_proj")]
    _, blocks, _ = find_decoder_blocks(model, names)
    batch = tokenizer(tiny_texts[:3], return_tensors="pt", padding=True)
    with torch.no_grad(), model.disable_adapter():
        _, arguments = record_block_inputs(model.eval(), blocks, [dict(batch)])
    sliding, full = (arguments[0][index][1]["attention_mask"] for index in (0, 1))
    assert not torch.equal(sliding, full)  # the model does pass different masks: using one for all would be wrong
    reference, _ = init_factors(tiny_gemma3_path, tiny_texts, streaming="off")
    replayed, report = init_factors(tiny_gemma3_path, tiny_texts, streaming="replay")
    assert report.streaming == "replay"
    assert_same_factors(replayed, reference)
