"""A merged export is a plain transformers model that computes what the quantized base + adapter computes at rank b:
Q + s_b B_b A_b in every quantized LoRA layer, Q elsewhere, the original tensors where nothing was quantized."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_quailora import compute_perplexity, export_merged, make_token_windows, use_exit, use_rank
from hf_quailora._peft_utils import record_adapter_facts
from hf_quailora.dynamic_rank import merge as merge_module
from hf_quailora.quantization import dequantize_weight

from testing_utils import R, make_model, require_bitsandbytes, save_adapter


# float32: the merged weight is the forward pass's Q + s·B·A up to float32 summation order.
# bfloat16: each weight is rounded to 8 mantissa bits (relative 2^-9), which moves logits of size ~1 by a few 1e-3.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def merged_tensors(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted({*json.load(open(index))["weight_map"].values()}) if os.path.exists(index) else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def load_merged(folder):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def nf4_model(tiny_model_path):
    model, tokenizer = make_model(tiny_model_path, "nf4")
    record_adapter_facts(model, rank_scaling="constant")
    return model.eval(), tokenizer


@require_bitsandbytes
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_logits_equal_the_nf4_base_plus_adapter_at_each_rank(nf4_model, tmp_path, dtype):
    model, tokenizer = nf4_model
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    for b in (1, 3, R):
        folder = export_merged(model, b, tmp_path / f"r{b}", dtype=dtype, tokenizer=tokenizer, show_progress=False)
        with torch.no_grad(), use_rank(model, b):
            expected = model(ids).logits
        with torch.no_grad():
            got = load_merged(folder)(ids).logits
        error = (got - expected).abs().max().item()
        assert error < TOLERANCE[dtype], (b, dtype, error)
    config = json.load(open(tmp_path / f"r{R}" / "config.json"))
    assert "quantization_config" not in config and config["dtype"] == config["torch_dtype"] == dtype


@require_bitsandbytes
def test_merged_weights_are_q_plus_the_update_and_untouched_tensors_are_the_original(nf4_model, tiny_model_path,
                                                                                    tmp_path):
    model, tokenizer = nf4_model
    folder = export_merged(model, 4, tmp_path / "m", dtype="float32", tokenizer=tokenizer, show_progress=False)
    merged, original = merged_tensors(folder), merged_tensors(tiny_model_path)
    assert set(merged) == set(original)  # the base model's own names: no base_model.model., no .base_layer
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    delta = (layer.lora_B["default"].weight[:, :4] @ layer.lora_A["default"].weight[:4]) * layer.scaling["default"]
    expected = dequantize_weight(layer.get_base_layer()) + delta  # constant scaling: s_b = α / r at every b
    torch.testing.assert_close(merged["model.layers.1.mlp.down_proj.weight"], expected, rtol=0, atol=1e-6)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert torch.equal(merged[name], original[name].float()), name


@require_bitsandbytes
def test_quantized_layers_without_lora_are_written_as_q(tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from hf_quailora import load_quantized_model

    base, tokenizer = load_quantized_model(tiny_model_path, "nf4")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    folder = export_merged(model, 2, tmp_path / "m", dtype="float32", show_progress=False)  # tokenizer: base's
    merged = merged_tensors(folder)
    v_proj = model.base_model.model.model.layers[0].self_attn.v_proj
    assert torch.equal(merged["model.layers.0.self_attn.v_proj.weight"], dequantize_weight(v_proj))
    assert os.path.isfile(tmp_path / "m" / "tokenizer.json")


@require_bitsandbytes
def test_shards_are_written_with_an_index_that_from_pretrained_follows(nf4_model, tmp_path):
    model, tokenizer = nf4_model
    folder = export_merged(model, 2, tmp_path / "m", dtype="float32", tokenizer=tokenizer, max_shard_size=200_000,
                           show_progress=False)
    index = json.load(open(tmp_path / "m" / "model.safetensors.index.json"))
    shards = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    load_merged(folder)


@require_bitsandbytes
def test_an_interrupted_merged_export_leaves_nothing_that_loads(nf4_model, tmp_path, monkeypatch):
    model, tokenizer = nf4_model
    real, calls = merge_module._value, []

    def fail_midway(entry, *args):
        calls.append(entry.name)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real(entry, *args)

    monkeypatch.setattr(merge_module, "_value", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        export_merged(model, 2, tmp_path / "m", tokenizer=tokenizer, max_shard_size=100_000, show_progress=False)
    assert not (tmp_path / "m").exists() and os.listdir(tmp_path) == []


def test_bad_input_is_refused_before_any_work(tiny_model_path, tmp_path, monkeypatch):
    model, _ = make_model(tiny_model_path)
    record_adapter_facts(model, max_rank=4)
    monkeypatch.setattr(merge_module, "_write_shards", lambda *args: pytest.fail("wrote before checking"))
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        export_merged(model, 2, tmp_path / "m", dtype="int8")
    with pytest.raises(ValueError, match="above this adapter's max_rank 4"):
        export_merged(model, 8, tmp_path / "m")
    with pytest.raises(ValueError, match="must be within|between|range"):
        export_merged(model, 0, tmp_path / "m")
    with pytest.raises(ValueError, match="already holds a model"):
        export_merged(model, 2, tiny_model_path)
    with pytest.raises(TypeError, match="PeftModel"):
        export_merged(model.get_base_model(), 2, tmp_path / "m")


def test_the_adapter_folder_is_refused(tiny_model_path, tmp_path):
    from hf_quailora.dynamic_rank.export import load_dynamic_rank_adapter

    folder = save_adapter(tiny_model_path, tmp_path / "adapter")
    loaded = load_dynamic_rank_adapter(tiny_model_path, folder)
    with pytest.raises(ValueError, match="is the folder of the adapter being merged"):
        export_merged(loaded.model, 2, folder)


@pytest.mark.slow
@require_bitsandbytes
def test_merged_float32_smollm2_keeps_the_nf4_plus_quailora_perplexity(smollm2_path, embedded_texts, tmp_path):
    from peft import LoraConfig, get_peft_model

    from hf_quailora import QuAILoRAConfig, load_quantized_model, quailora_init

    base, tokenizer = load_quantized_model(smollm2_path, "nf4")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    calibration = make_token_windows(tokenizer, embedded_texts["c4"], 128, 4)
    quailora_init(model, calibration, QuAILoRAConfig(show_progress=False))
    held_out = make_token_windows(tokenizer, embedded_texts["wiki"], 128, 4)
    with use_rank(model, 4, update_rule="frozen", rank_scaling="constant"):
        expected = compute_perplexity(model, held_out, batch_size=4)
    folder = export_merged(model, 4, tmp_path / "m", dtype="float32", rank_scaling="constant", tokenizer=tokenizer,
                           show_progress=False)
    del model, base
    merged = compute_perplexity(load_merged(folder), held_out, batch_size=4)
    assert f"{merged:.4g}" == f"{expected:.4g}", (merged, expected)


@require_bitsandbytes
def test_cli_export_merged_writes_the_rank_merged_into_the_recorded_base(nf4_model, tmp_path, capsys):
    from hf_quailora import DynamicRankMetadata
    from hf_quailora.cli import main as cli_main
    from hf_quailora.dynamic_rank.export import load_dynamic_rank_adapter

    model, tokenizer = nf4_model
    model.save_pretrained(tmp_path / "adapter")
    DynamicRankMetadata.for_model(model, max_rank=R, rank_scaling="constant").save(tmp_path / "adapter")
    base = model.get_base_model().name_or_path
    args = ["export", "--model", base, "--adapter", str(tmp_path / "adapter"), "--rank", "3"]
    assert cli_main([*args, "--merged", "--dtype", "float32", "--output_dir", str(tmp_path / "m")]) == 0
    assert "merged into the dequantized base" in capsys.readouterr().out
    loaded = load_dynamic_rank_adapter(base, tmp_path / "adapter")  # NF4, as recorded
    ids = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_rank(loaded.model, 3):
        expected = loaded.model(ids).logits
    with torch.no_grad():
        assert (load_merged(tmp_path / "m")(ids).logits - expected).abs().max() < TOLERANCE["float32"]
    # SoFT by depth: --exit 1 writes a 1-layer model equal to use_exit(1) + use_rank(3) of base + adapter
    assert cli_main([*args, "--merged", "--exit", "1", "--dtype", "float32", "--output_dir", str(tmp_path / "e1")]) == 0
    with torch.no_grad(), use_exit(loaded.model, 1), use_rank(loaded.model, 3):
        expected = loaded.model(ids).logits
    shallow = load_merged(tmp_path / "e1")  # no missing or unexpected keys: exactly the first layer's tensors
    assert shallow.config.num_hidden_layers == 1 and len(loaded.model.get_base_model().model.layers) == 2
    with torch.no_grad():
        assert (shallow(ids).logits - expected).abs().max() < TOLERANCE["float32"]
    with pytest.raises(ValueError, match="is the folder of the adapter being merged"):
        cli_main([*args, "--merged", "--output_dir", str(tmp_path / "adapter")])
    with pytest.raises(SystemExit, match="--dtype is only used with --merged"):
        cli_main([*args, "--dtype", "float16", "--output_dir", str(tmp_path / "r3")])


def test_lora_on_a_tied_lm_head_is_refused(tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, tie_word_embeddings=True)
    base.tie_weights()
    if base.lm_head.weight is not base.model.embed_tokens.weight:
        pytest.skip("this transformers version does not tie the weights here")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    with pytest.raises(ValueError, match="share their weight with another layer"):
        export_merged(model, 2, tmp_path / "m", show_progress=False)
    assert not (tmp_path / "m").exists()


@require_bitsandbytes
def test_a_trained_modules_to_save_copy_is_written_not_the_checkpoints(tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from hf_quailora import load_quantized_model

    base, tokenizer = load_quantized_model(tiny_model_path, "nf4")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                            init_lora_weights=False)).eval()
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # "trained"
    folder = export_merged(model, 4, tmp_path / "m", dtype="float32", rank_scaling="constant", show_progress=False)
    ids = torch.randint(0, len(tokenizer), (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), use_rank(model, 4, rank_scaling="constant", update_rule="frozen"):
        expected = model(ids).logits
    with torch.no_grad():
        assert (load_merged(folder)(ids).logits - expected).abs().max() < TOLERANCE["float32"]
