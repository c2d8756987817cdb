"""Truncation, use_rank, TrainedRanks and export_rank on the tiny Llama (unquantized, NF4 and int8 bases)."""

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_quailora import export_rank, use_rank
from hf_quailora._peft_utils import record_adapter_facts
from hf_quailora.dynamic_rank.saved_adapter import read_saved_adapter
from hf_quailora.dynamic_rank.truncation import TrainedRanks, _TruncatedLoraLinear, find_dynamic_rank_layers
from hf_quailora.quantization import load_quantized_model

from testing_utils import one_thread, require_bitsandbytes, save_adapter  # noqa: F401 (autouse fixture)


R, ALPHA = 8, 16


def make_peft_model(path, quantization="none", r=R, alpha=ALPHA, seed=0, **lora_kwargs):
    """A LoRA model with random (non-zero) A and B, so every component matters."""
    model, _ = load_quantized_model(path, quantization=quantization)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False, **lora_kwargs)
    model = get_peft_model(model, config)
    model.eval()
    return model


def input_ids(seed=0, batch=2, length=12, vocab=300):
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def base_output(layer, x, quantization):
    """`x Wᵀ` with the weight the base layer really uses (int8 quantizes activations too: ask the layer)."""
    base = layer.get_base_layer()
    if quantization == "none":
        return torch.nn.functional.linear(x, base.weight, base.bias)
    if quantization == "nf4":
        from hf_quailora.quantization import dequantize_weight

        return torch.nn.functional.linear(x, dequantize_weight(base), base.bias)
    return base(x)


def explicit_scaling(layer, b, scaling):
    alpha, r = layer.lora_alpha["default"], layer.r["default"]
    return {"per_rank": alpha / b, "rslora": alpha / math.sqrt(b), "constant": alpha / r}[scaling]


QUANTIZATIONS = [
    "none",
    pytest.param("nf4", marks=require_bitsandbytes),
    pytest.param("int8", marks=require_bitsandbytes),
]


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("scaling", ["per_rank", "constant", "rslora"])
def test_truncated_forward_equals_explicit_computation(tiny_model_path, quantization, scaling):
    model = make_peft_model(tiny_model_path, quantization)
    layers = find_dynamic_rank_layers(model)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    for b in (1, 3, R):
        for name, layer in layers.items():
            if layer.in_features != 64:
                continue
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            s_b = explicit_scaling(layer, b, scaling)
            expected = base_output(layer, x, quantization) + s_b * (x @ A[:b].T) @ B[:, :b].T
            with torch.no_grad(), use_rank(model, b, rank_scaling=scaling):
                got = layer(x)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"{name} at rank {b}")


def test_use_rank_restores_state_and_nests(tiny_model_path):
    model = make_peft_model(tiny_model_path)
    ids = input_ids()
    layer = next(iter(find_dynamic_rank_layers(model).values()))
    scaling_before = layer.scaling["default"]
    with torch.no_grad():
        full = model(ids).logits
        with use_rank(model, 3):
            at_3 = model(ids).logits
            with use_rank(model, 1):
                at_1 = model(ids).logits
            torch.testing.assert_close(model(ids).logits, at_3)  # outer rank restored
        after = model(ids).logits
    assert not torch.allclose(at_3, at_1)
    assert not torch.allclose(full, at_3)
    torch.testing.assert_close(after, full)
    assert layer.scaling["default"] == scaling_before
    assert type(layer.lora_A["default"]) is torch.nn.Linear and type(layer.lora_B["default"]) is torch.nn.Linear
    assert "merge" not in layer.__dict__
    # the full rank with peft's own scaling (alpha / r) is the untouched peft model
    with torch.no_grad(), use_rank(model, R, rank_scaling="per_rank"):
        torch.testing.assert_close(model(ids).logits, full)


def test_use_rank_restores_state_after_an_exception(tiny_model_path):
    model = make_peft_model(tiny_model_path)
    layer = next(iter(find_dynamic_rank_layers(model).values()))
    before = layer.scaling["default"]
    with pytest.raises(KeyError):
        with use_rank(model, 2):
            raise KeyError("boom")
    assert layer.scaling["default"] == before and type(layer.lora_A["default"]) is torch.nn.Linear


def test_truncation_keeps_parameters_and_state_dict_keys(tiny_model_path):
    model = make_peft_model(tiny_model_path)
    params_before = {name: param for name, param in model.named_parameters()}
    keys_before = list(model.state_dict())
    with use_rank(model, 2):
        assert {name: param for name, param in model.named_parameters()} == params_before  # same Parameter objects
        assert list(model.state_dict()) == keys_before
        assert all(
            type(layer.lora_A["default"]) is _TruncatedLoraLinear for layer in find_dynamic_rank_layers(model).values()
        )


@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=require_bitsandbytes)])
def test_frozen_rule_only_component_b_learns_nested_rule_all_up_to_b(tiny_model_path, quantization):
    model = make_peft_model(tiny_model_path, quantization)
    model.train()
    ids = input_ids()
    b = 4
    for rule in ("frozen", "nested"):
        model.zero_grad(set_to_none=True)
        with use_rank(model, b, update_rule=rule):
            model(ids, labels=ids).loss.backward()
        for name, layer in find_dynamic_rank_layers(model).items():
            grad_A = layer.lora_A["default"].weight.grad.abs().sum(dim=1)  # per component (row of A)
            grad_B = layer.lora_B["default"].weight.grad.abs().sum(dim=0)  # per component (column of B)
            for grad in (grad_A, grad_B):
                assert torch.all(grad[b:] == 0), f"{name} ({rule}): components above b got gradient"
                assert grad[b - 1] > 0, f"{name} ({rule}): component b got no gradient"
                if rule == "frozen":
                    assert torch.all(grad[: b - 1] == 0), f"{name}: frozen rule let components < b learn"
                else:
                    assert torch.all(grad[: b - 1] > 0), f"{name}: nested rule froze components < b"


def test_frozen_rule_at_min_rank_trains_all_components_up_to_it(tiny_model_path):
    model = make_peft_model(tiny_model_path)
    model.train()
    ids = input_ids()
    with use_rank(model, 2, update_rule="frozen", min_rank=2):
        model(ids, labels=ids).loss.backward()
    layer = next(iter(find_dynamic_rank_layers(model).values()))
    assert torch.all(layer.lora_A["default"].weight.grad.abs().sum(dim=1)[:2] > 0)


def test_gradient_checkpointing_recomputes_at_the_same_rank(tiny_model_path):
    ids = input_ids()
    grads = {}
    for checkpointing in (False, True):
        model = make_peft_model(tiny_model_path)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        with use_rank(model, 3, update_rule="frozen"):
            model(ids, labels=ids).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=require_bitsandbytes)])
@pytest.mark.parametrize("scaling", ["per_rank", "constant", "rslora"])
def test_export_rank_round_trips_through_vanilla_peft(tiny_model_path, tmp_path, quantization, scaling):
    model = make_peft_model(tiny_model_path, quantization)
    ids = input_ids()
    for b in (1, 5):
        with torch.no_grad(), use_rank(model, b, rank_scaling=scaling):
            expected = model(ids).logits
        folder = export_rank(model, b, str(tmp_path / f"rank-{b}"), rank_scaling=scaling)
        base, _ = load_quantized_model(tiny_model_path, quantization=quantization)
        loaded = PeftModel.from_pretrained(base, folder)
        loaded.eval()
        assert loaded.peft_config["default"].r == b
        layer = next(iter(find_dynamic_rank_layers(loaded).values()))
        assert layer.lora_A["default"].weight.shape[0] == b
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_full_adapter_save_and_reload_round_trips(tiny_model_path, tmp_path):
    model = make_peft_model(tiny_model_path)
    ids = input_ids()
    with torch.no_grad(), use_rank(model, 2):
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "full")
    # reload into a second copy whose factors differ, like the trainer's model before resuming
    other = make_peft_model(tiny_model_path, seed=123)
    other.load_adapter(str(tmp_path / "full"), adapter_name="default")
    with torch.no_grad(), use_rank(other, 2):
        torch.testing.assert_close(other(ids).logits, expected)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    fresh = PeftModel.from_pretrained(base, str(tmp_path / "full"))
    fresh.eval()
    with torch.no_grad(), use_rank(fresh, 2):
        torch.testing.assert_close(fresh(ids).logits, expected)


# Bad input


def test_use_rank_and_export_reject_ranks_out_of_range(tiny_model_path, tmp_path):
    model = make_peft_model(tiny_model_path)
    for b in (0, R + 1):
        with pytest.raises(ValueError, match=f"`rank` holds rank {b}, outside this adapter's range"):
            with use_rank(model, b):
                pass
        with pytest.raises(ValueError, match=f"`export rank` holds rank {b}, outside this adapter's range"):
            export_rank(model, b, str(tmp_path / "x"))
    with pytest.raises(TypeError, match="integer"):
        with use_rank(model, 2.0):
            pass
    with pytest.raises(ValueError, match="update_rule"):
        with use_rank(model, 2, update_rule="sometimes"):
            pass
    with pytest.raises(ValueError, match="rank_scaling"):
        export_rank(model, 2, str(tmp_path / "x"), rank_scaling="alpha")


def test_model_without_lora_layers_is_rejected(tiny_model_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        with use_rank(model, 1):
            pass
    with pytest.raises(TypeError, match="PeftModel"):
        export_rank(model, 1, str(tmp_path / "x"))


def test_merge_is_refused_while_truncated_and_merged_models_are_rejected(tiny_model_path):
    model = make_peft_model(tiny_model_path)
    layer = next(iter(find_dynamic_rank_layers(model).values()))
    with use_rank(model, 2):
        with pytest.raises(RuntimeError, match="cannot merge"):
            layer.merge()
    layer.merge()  # allowed outside
    with pytest.raises(ValueError, match="merged"):
        with use_rank(model, 2):
            pass


def test_dora_is_rejected(tiny_model_path):
    model, _ = load_quantized_model(tiny_model_path, quantization="none")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        with use_rank(model, 1):
            pass


# TrainedRanks: the ranks an adapter can run at, from a model or a saved adapter


def test_trained_ranks_from_a_model_read_its_lora_r_and_the_recorded_range(tiny_model_path):
    model = make_peft_model(tiny_model_path)
    assert TrainedRanks.from_model(model) == TrainedRanks(lora_rank=R, max_rank=R, min_rank=1)
    record_adapter_facts(model, max_rank=4, min_rank=2)  # what DynamicRankTrainer(max_rank=4) records
    ranks = TrainedRanks.from_model(model)
    assert (ranks.lora_rank, ranks.max_rank, ranks.min_rank) == (R, 4, 2)
    ranks.check([1, 4], "ranks")  # evaluation may go below min_rank
    with pytest.raises(ValueError, match="`ranks` holds rank 6, above this adapter's max_rank 4"):
        ranks.check([1, 6], "ranks")
    with pytest.raises(ValueError, match=r"`ranks` holds rank 9, outside this adapter's range 1\.\.4"):
        ranks.check([9], "ranks")


def test_trained_ranks_from_a_saved_adapter_need_no_model(tiny_model_path, tmp_path):
    dynamic = read_saved_adapter(save_adapter(tiny_model_path, tmp_path / "dynamic", max_rank=4, min_rank=2))
    assert TrainedRanks.from_saved(dynamic) == TrainedRanks(lora_rank=R, max_rank=4, min_rank=2)
    plain = TrainedRanks.from_saved(read_saved_adapter(save_adapter(tiny_model_path, tmp_path / "plain",
                                                                    max_rank=None)))
    assert plain == TrainedRanks(lora_rank=R, max_rank=R)
    with pytest.raises(ValueError, match=r"`--rank` holds rank 9, outside this adapter's range 1\.\.8"):
        plain.check([9], "--rank")
    with pytest.raises(ValueError, match=r"`max_rank` \(9\) exceeds the LoRA r \(8\)"):
        TrainedRanks(lora_rank=8, max_rank=9)


@require_bitsandbytes
def test_quailora_init_gives_every_truncated_rank_its_own_optimum_under_constant_scaling(tiny_model_path, tiny_texts):
    from hf_quailora import QuAILoRAConfig, quailora_init
    from hf_quailora.dynamic_rank.spec import rank_scaling_for

    def initialised(r):
        model, tokenizer = load_quantized_model(tiny_model_path, quantization="nf4")
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=ALPHA, target_modules="all-linear"))
        config = QuAILoRAConfig(calibration_samples=len(tiny_texts), calibration_length=32, show_progress=False)
        quailora_init(model, tiny_texts, config, tokenizer=tokenizer)
        return find_dynamic_rank_layers(model)

    full = initialised(R)
    for b in (1, 3):
        # the reference: QuAILoRA solved directly at rank b (its own calibrated optimum)
        for name, layer in initialised(b).items():
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            expected = layer.scaling["default"] * B @ A
            big = full[name]
            s = rank_scaling_for(big, "default", b, "constant")
            got = s * big.lora_B["default"].weight[:, :b] @ big.lora_A["default"].weight[:b]
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item(), msg=name)


def test_export_writes_a_per_layer_alpha_pattern_when_alphas_differ(tiny_model_path, tmp_path):
    model = make_peft_model(tiny_model_path, alpha_pattern={"q_proj": 5})
    ids = input_ids()
    with torch.no_grad(), use_rank(model, 3, rank_scaling="constant"):
        expected = model(ids).logits
    folder = export_rank(model, 3, str(tmp_path / "rank-3"), rank_scaling="constant")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), folder)
    loaded.eval()
    assert loaded.peft_config["default"].alpha_pattern
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
