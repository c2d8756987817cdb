"""quailora_init on a tiny Llama quantized by bitsandbytes on the CPU: numbers, scaling, errors."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from hf_quailora import QuAILoRAConfig, quailora_init
from hf_quailora.quailora.solvers import calibrated_error, solve_closed_form
from hf_quailora.quailora.weights import FullPrecisionWeights
from hf_quailora.quantization import dequantize_weight, load_quantized_model

from testing_utils import TINY_LINEAR_LAYERS, require_bitsandbytes, snapshot


pytestmark = require_bitsandbytes


def quantized_lora(path, quantization="nf4", r=4, alpha=None, rslora=False, targets="all-linear"):
    model, tokenizer = load_quantized_model(path, quantization)
    config = LoraConfig(r=r, lora_alpha=alpha or r, use_rslora=rslora, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, config), tokenizer


def logits_distance(model, reference, ids):
    with torch.no_grad():
        return float((model(input_ids=ids).logits - reference(input_ids=ids).logits).pow(2).mean())


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_quailora_moves_the_quantized_model_towards_full_precision(tiny_model_path, tiny_texts, quantization):
    fp = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    model, tokenizer = quantized_lora(tiny_model_path, quantization)
    model.eval()
    ids = tokenizer(tiny_texts[:4], return_tensors="pt", padding=True)["input_ids"]
    before_params = snapshot(model)
    before = logits_distance(model, fp, ids)
    config = QuAILoRAConfig(show_progress=False, report_svd_baseline=True)
    report = quailora_init(model, tiny_texts, config, tokenizer=tokenizer)
    after = logits_distance(model, fp, ids)
    # LLM.int8 also rounds the activations, an error no weight correction removes: a smaller margin there.
    assert after < (0.9 if quantization == "int8" else 0.5) * before, (before, after)
    assert len(report.layers) == TINY_LINEAR_LAYERS and not report.skipped
    for layer in report.layers:
        assert layer.quantization == quantization
        assert layer.calibrated_error_result < layer.calibrated_error_svd <= layer.calibrated_error_qlora, layer.name
    changed = [name for name, value in snapshot(model).items() if not torch.equal(value, before_params[name])]
    assert len(changed) == 2 * TINY_LINEAR_LAYERS  # every lora_A and lora_B


def test_written_product_is_the_closed_form_optimum_under_any_scaling(tiny_model_path, tiny_texts):
    """s·B·A is the same optimum whatever lora_alpha / rsLoRA say, and equals a direct solve of E, H."""
    products = []
    for alpha, rslora in ((4, False), (16, False), (8, True)):
        model, tokenizer = quantized_lora(tiny_model_path, r=4, alpha=alpha, rslora=rslora)
        quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False, damping=1e-4), tokenizer=tokenizer)
        layer = model.base_model.model.model.layers[1].mlp.down_proj
        s = layer.scaling["default"]
        assert math.isclose(s, alpha / (math.sqrt(4) if rslora else 4))
        products.append(s * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double())
    torch.testing.assert_close(products[0], products[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(products[0], products[2], rtol=1e-5, atol=1e-7)


def test_truncated_start_is_the_rank_b_optimum(tiny_model_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_model_path, r=8)
    report = quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False, damping=1e-4), tokenizer=tokenizer)
    name = "base_model.model.model.layers.0.self_attn.o_proj"
    layer = model.get_submodule(name)
    E = FullPrecisionWeights.from_any(tiny_model_path).get(name).double() - dequantize_weight(layer.base_layer).double()
    # Recompute H for o_proj independently with a plain hook on its input.
    grams = []
    hook = layer.register_forward_hook(lambda m, a, o: grams.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    batch = tokenizer(tiny_texts, return_tensors="pt", padding=True)
    with torch.no_grad(), model.disable_adapter():
        model(**batch)
    hook.remove()
    X = grams[0][batch["attention_mask"].reshape(-1).bool()]
    H = X.T @ X / X.shape[0]
    s = layer.scaling["default"]
    B, A = s * layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
    assert math.isclose(report.layers[3].calibrated_error_result, float(calibrated_error(E, H, B, A)), rel_tol=1e-4)
    for b in (1, 3, 8):
        Bb, Ab, _ = solve_closed_form(E, H, b, damping=1e-4)
        assert math.isclose(float(calibrated_error(E, H, B[:, :b], A[:b])), float(calibrated_error(E, H, Bb, Ab)),
                            rel_tol=1e-4)


def test_als_matches_closed_form(tiny_model_path, tiny_texts):
    reports = {}
    for solver in ("closed_form", "als"):
        model, tokenizer = quantized_lora(tiny_model_path, r=4)
        config = QuAILoRAConfig(solver=solver, als_iterations=50, show_progress=False)
        reports[solver] = quailora_init(model, tiny_texts, config, tokenizer=tokenizer)
    for exact, als in zip(reports["closed_form"].layers, reports["als"].layers):
        assert als.calibrated_error_result <= exact.calibrated_error_result * 1.01, exact.name


def test_svd_solver_needs_no_calibration(tiny_model_path):
    model, _ = quantized_lora(tiny_model_path)
    report = quailora_init(model, None, QuAILoRAConfig(solver="svd", show_progress=False))
    assert report.num_tokens == 0
    for layer in report.layers:
        assert layer.calibrated_error_result is None
        assert math.isclose(layer.frobenius_error_result, layer.frobenius_error_svd, rel_tol=1e-6)


def test_state_dict_source_equals_folder_source(tiny_model_path, tiny_texts):
    state_dict = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    weights = []
    for source in (None, state_dict):
        model, tokenizer = quantized_lora(tiny_model_path)
        quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False), tokenizer=tokenizer,
                      full_precision_weights=source)
        weights.append(snapshot(model))
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name])


def test_unquantized_layers_are_skipped_and_reported(tiny_model_path, tiny_texts):
    # lm_head is not quantized by bitsandbytes (transformers keeps it in full precision): E = 0 there.
    model, tokenizer = quantized_lora(tiny_model_path, targets=["q_proj", "lm_head"])
    report = quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False), tokenizer=tokenizer)
    assert "base_model.model.lm_head" in report.skipped
    assert all("q_proj" in layer.name for layer in report.layers)


# ---------------------------------------------------------------- bad input: errors before work is spent


def test_error_model_without_lora(tiny_model_path, tiny_texts):
    model, tokenizer = load_quantized_model(tiny_model_path, "nf4")
    with pytest.raises(ValueError, match="no LoRA layers"):
        quailora_init(model, tiny_texts, tokenizer=tokenizer)


def test_error_unquantized_base(tiny_model_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_model_path, quantization="none")
    with pytest.raises(ValueError, match="E = 0"):
        quailora_init(model, tiny_texts, tokenizer=tokenizer)


def test_error_bad_config():
    with pytest.raises(ValueError, match="solver"):
        QuAILoRAConfig(solver="magic")
    with pytest.raises(ValueError, match="damping"):
        QuAILoRAConfig(damping=float("nan"))
    with pytest.raises(ValueError, match=r"`calibration_samples` \(0\)"):
        QuAILoRAConfig(calibration_samples=0)


def test_error_empty_calibration_and_padding_only(tiny_model_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_model_path)
    with pytest.raises(ValueError, match="empty"):
        quailora_init(model, [], tokenizer=tokenizer)
    padding_only = [{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5)}]
    with pytest.raises(ValueError, match="no non-padding tokens"):
        quailora_init(model, padding_only, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs calibration data"):
        quailora_init(model, None)


def test_error_missing_or_bad_full_precision_weights(tiny_model_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_model_path)
    state_dict = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    missing = {k: v for k, v in state_dict.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj: no full-precision weight"):
        quailora_init(model, tiny_texts, tokenizer=tokenizer, full_precision_weights=missing)
    wrong = dict(state_dict, **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="does not match"):
        quailora_init(model, tiny_texts, tokenizer=tokenizer, full_precision_weights=wrong)
    bad = dict(state_dict)
    bad["model.layers.0.mlp.down_proj.weight"] = bad["model.layers.0.mlp.down_proj.weight"].clone()
    bad["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.0.mlp.down_proj: the full-precision weight W is not finite"):
        quailora_init(model, tiny_texts, tokenizer=tokenizer, full_precision_weights=bad)


def test_error_rank_too_large(tiny_model_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_model_path, r=40, targets=["k_proj"])  # k_proj is 32×64
    with pytest.raises(ValueError, match="k_proj: LoRA rank 40 exceeds"):
        quailora_init(model, tiny_texts, tokenizer=tokenizer)


def test_error_non_finite_gram(tiny_model_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_model_path)
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="Gram matrix of the input of .* is not finite"):
        quailora_init(model, tiny_texts, tokenizer=tokenizer)


def test_no_partial_writes_on_error(tiny_model_path, tiny_texts):
    model, tokenizer = quantized_lora(tiny_model_path)
    state_dict = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    state_dict["model.layers.1.mlp.down_proj.weight"] = torch.full_like(state_dict["model.layers.1.mlp.down_proj.weight"], float("inf"))
    before = snapshot(model)
    with pytest.raises(ValueError, match="not finite"):
        quailora_init(model, tiny_texts, tokenizer=tokenizer, full_precision_weights=state_dict)
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name]), name


def test_former_calibration_names_are_deprecated_aliases_not_fields():
    import dataclasses

    from hf_quailora import QuAILoRAInitCallback

    with pytest.warns(FutureWarning) as record:
        config = QuAILoRAConfig(num_samples=8, max_length=32, batch_size=2)
    assert [str(warning.message) for warning in record] == [
        f"`{old}` is deprecated; use `{new}`." for old, new in
        (("num_samples", "calibration_samples"), ("max_length", "calibration_length"),
         ("batch_size", "calibration_batch_size"))
    ]
    assert (config.calibration_samples, config.calibration_length, config.calibration_batch_size) == (8, 32, 2)
    with pytest.warns(FutureWarning, match="`max_length` is deprecated; use `calibration_length`"):
        assert config.max_length == 32  # read-only attribute
    with pytest.raises(AttributeError):
        config.num_samples = 4
    with pytest.raises(TypeError, match="`num_samples` and `calibration_samples` were both given"):
        QuAILoRAConfig(num_samples=8, calibration_samples=8)
    names = {field.name for field in dataclasses.fields(QuAILoRAConfig)}
    assert not names & {"num_samples", "max_length", "batch_size"}  # a parser never sees them (SFTConfig's max_length)
    with pytest.warns(FutureWarning, match="`num_samples` is deprecated"):
        callback = QuAILoRAInitCallback(config=QuAILoRAConfig(solver="als"), num_samples=4)
    assert (callback.config.solver, callback.config.calibration_samples) == ("als", 4)
