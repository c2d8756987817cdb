"""Q is the exact weight bitsandbytes uses; W is found in state dicts and safetensors folders."""

import pytest
import torch

from hf_quailora.quailora.weights import FullPrecisionWeights
from hf_quailora.quantization import dequantize_weight, disable_bnb_cpu_fast_path, quantization_kind

from testing_utils import require_bitsandbytes


def make_4bit_layer(quant_type, blocksize, double_quant, seed=0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = torch.nn.Linear(128, 96, bias=True)
    layer = bnb.nn.Linear4bit(128, 96, bias=True, quant_type=quant_type, compress_statistics=double_quant,
                              compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     blocksize=blocksize, compress_statistics=double_quant, module=layer)
    layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    layer = layer.to("cpu")  # quantizes here
    if layer.weight.quant_state is None:
        layer.weight = layer.weight._quantize("cpu")
    disable_bnb_cpu_fast_path(layer)
    return layer, dense


@require_bitsandbytes
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantized_4bit_weight_is_what_the_forward_uses(quant_type, blocksize, double_quant):
    layer, dense = make_4bit_layer(quant_type, blocksize, double_quant)
    assert quantization_kind(layer) == quant_type
    assert layer.weight.quant_state.blocksize == blocksize
    Q = dequantize_weight(layer)
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), x @ Q.T + layer.bias, rtol=1e-4, atol=1e-4)
    error = (dense.weight - Q).norm() / dense.weight.norm()
    assert 0 < error < 0.2  # a real quantization error, not zero and not garbage


@require_bitsandbytes
def test_dequantized_int8_weight_is_what_the_forward_uses():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 96, bias=False)
    layer = bnb.nn.Linear8bitLt(128, 96, bias=False, has_fp16_weights=False, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    if layer.weight.dtype != torch.int8:
        layer.weight = layer.weight._quantize("cpu") if hasattr(layer.weight, "_quantize") else layer.weight
    if layer.weight.dtype != torch.int8:
        pytest.skip("this bitsandbytes build does not quantize int8 on the CPU by .to('cpu')")
    assert quantization_kind(layer) == "int8"
    Q = dequantize_weight(layer)
    from peft.utils.integrations import dequantize_bnb_weight

    torch.testing.assert_close(Q, dequantize_bnb_weight(layer.weight, state=layer.state).float())
    x = torch.randn(4, 128)
    # LLM.int8 also quantizes the activations, so the forward matches x Qᵀ only to activation-rounding accuracy.
    assert (layer(x).float() - x @ Q.T).norm() / (x @ Q.T).norm() < 2e-2


def test_dequantize_rejects_plain_layers():
    with pytest.raises(TypeError, match="not a bitsandbytes"):
        dequantize_weight(torch.nn.Linear(4, 4))


def test_weights_from_state_dict_and_folder(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    peft_name = "base_model.model.model.layers.1.mlp.down_proj"
    expected = model.model.layers[1].mlp.down_proj.weight
    for source in (tiny_model_path, model.state_dict()):
        weights = FullPrecisionWeights.from_any(source)
        assert weights.shape(peft_name) == tuple(expected.shape)
        torch.testing.assert_close(weights.get(peft_name), expected.detach())
        assert weights.shape("base_model.model.model.layers.7.mlp.down_proj") is None


def test_weights_bad_source(tmp_path):
    with pytest.raises(TypeError, match="full_precision_weights"):
        FullPrecisionWeights.from_any(3.5)
    with pytest.raises(ValueError, match="No safetensors"):
        FullPrecisionWeights.from_any(str(tmp_path))


def test_short_keys_never_match_every_layer_alike(tiny_model_path):
    """A state dict of one block (keys like `self_attn.q_proj.weight`) must not serve every layer's q_proj."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    weights = FullPrecisionWeights.from_any(model.model.layers[0].state_dict())
    assert weights.shape("base_model.model.model.layers.1.self_attn.q_proj") is None
    # a state dict taken from a peft-wrapped model (".base_layer.weight") is found
    peft_keys = {"base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight": torch.zeros(64, 64)}
    assert FullPrecisionWeights.from_any(peft_keys).shape("base_model.model.model.layers.1.self_attn.q_proj") == (64, 64)


@require_bitsandbytes
def test_the_bitsandbytes_warning_filter_is_opt_in(tiny_model_path):
    import subprocess
    import sys

    code = (
        "import logging; from hf_quailora import load_quantized_model, quiet_bnb_warnings; "
        f"load_quantized_model({tiny_model_path!r}, 'nf4'); "
        "bnb = logging.getLogger('bitsandbytes.autograd._functions'); before = len(bnb.filters); "
        "quiet_bnb_warnings(); quiet_bnb_warnings(); print(before, len(bnb.filters))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["0", "1"]


@require_bitsandbytes
@pytest.mark.parametrize("given", [None, True])
def test_offline_loads_keep_the_torch_layers_unless_hub_kernels_are_asked_for(tiny_model_path, monkeypatch, given):
    """transformers swaps layers for Hub kernels by default; offline, an uncached one fails a GPU load (H200 run)."""
    from hf_quailora import load_quantized_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs = {} if given is None else {"use_kernels": given}
    try:
        model, _ = load_quantized_model(tiny_model_path, "nf4", **kwargs)
    except ValueError as err:  # asked for explicitly: transformers tries the Hub, and may say it cannot
        assert given and "kernel" in str(err).lower()
        return
    assert model.use_kernels is bool(given)
