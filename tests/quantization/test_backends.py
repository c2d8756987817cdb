"""A second quantization backend is one module plus one registration: a fake-quantized linear layer whose Q is known
(`codes · scale`) is recognised, dequantized, recorded in `dynamic_rank.json`, and initialised by QuAILoRA."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_quailora import DynamicRankMetadata, QuAILoRAConfig, quailora_init
from hf_quailora.dynamic_rank.export import load_dynamic_rank_adapter
from hf_quailora.quantization import (
    BACKENDS,
    LOAD_QUANTIZATIONS,
    QuantizationBackend,
    base_quantization,
    dequantize_weight,
    model_quantization,
    prepare_for_exact_weights,
    quantization_kind,
    recorded_quantizations,
    register_backend,
    unregister_backend,
    why_not_quantized,
)

from testing_utils import TINY_LINEAR_LAYERS


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# The fake backend: what a GPTQ/HQQ/torchao module would hold in its own file


class FakeQuantLinear(torch.nn.Module):
    """Symmetric 4-bit codes with one float32 scale per output row; the forward uses exactly `Q = codes · scale`.

    A plain `nn.Module` (not an `nn.Linear`), like the quantized layers of other libraries; its codes are called
    `qweight`, as GPTQ's are, which is where peft looks for the device of a layer without parameters.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 7
        self.register_buffer("qweight", torch.round(weight / scale).clamp(-8, 7).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone())
        self.prepared = 0

    def forward(self, x):
        Q = self.qweight.to(x.dtype) * self.scale.to(x.dtype)
        return torch.nn.functional.linear(x, Q, self.bias)


def _fake_kind(layer):
    return "fake4" if isinstance(layer, FakeQuantLinear) else None


def _fake_prepare(model):
    layers = [module for module in model.modules() if isinstance(module, FakeQuantLinear)]
    for layer in layers:
        layer.prepared += 1
    return len(layers)


FAKE_BACKEND = QuantizationBackend(
    name="fake",
    kinds=("fake4",),
    layer_description="a FakeQuantLinear layer",
    kind=_fake_kind,
    dequantize=lambda layer: layer.qweight.float() * layer.scale,
    prepare_for_exact_weights=_fake_prepare,
    bits_per_weight={"fake4": 4 + 32 / 64},
)


@pytest.fixture
def fake_backend():
    register_backend(FAKE_BACKEND)
    try:
        yield FAKE_BACKEND
    finally:
        unregister_backend(FAKE_BACKEND.name)


def fake_quantized(path) -> torch.nn.Module:
    """The tiny Llama with every block linear layer replaced by a `FakeQuantLinear` (lm_head stays full precision)."""
    model = AutoModelForCausalLM.from_pretrained(path)
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")]
    for name in names:
        model.set_submodule(name, FakeQuantLinear(model.get_submodule(name)))
    return model


def fake_lora(path, r=4):
    """peft dispatches only layers it knows; the custom-module mapping wraps FakeQuantLinear in peft's lora.Linear."""
    config = LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, lora_dropout=0.0)
    config._register_custom_module({FakeQuantLinear: LoraLinear})
    with warnings.catch_warnings():  # "Unsupported layer type ... proceed at your own risk": the point of the test
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        return get_peft_model(fake_quantized(path), config)


# The seam answers for the new backend


def test_the_fake_backend_is_recognised_and_its_q_is_exact(fake_backend):
    torch.manual_seed(0)
    dense = torch.nn.Linear(32, 16)
    layer = FakeQuantLinear(dense)
    assert quantization_kind(layer) == "fake4"
    Q = dequantize_weight(layer)
    torch.testing.assert_close(Q, layer.qweight.float() * layer.scale, rtol=0, atol=0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ Q.T + layer.bias)
    assert 0 < (dense.weight - Q).norm() / dense.weight.norm() < 0.2  # a real quantization error
    assert quantization_kind(dense) is None
    with pytest.raises(TypeError, match="is not a bitsandbytes Linear4bit/Linear8bitLt layer nor a FakeQuantLinear"):
        dequantize_weight(dense)
    # bitsandbytes, first in the list, still explains unquantized nn.Linear layers
    assert "excluded from quantization" in why_not_quantized(dense)


def test_the_fake_kind_is_recorded_but_not_loadable(fake_backend):
    assert recorded_quantizations()[-2:] == ("fake4", "none")
    assert "fake4" not in LOAD_QUANTIZATIONS
    assert DynamicRankMetadata(max_rank=4, quantization="fake4").quantization == "fake4"


def test_registration_refuses_clashes_and_unregistering_restores_the_list(fake_backend):
    with pytest.raises(ValueError, match="registered already"):
        register_backend(FAKE_BACKEND)
    clash = QuantizationBackend(name="other", kinds=("nf4", "none"), layer_description="x", kind=_fake_kind,
                                dequantize=torch.zeros_like)
    with pytest.raises(ValueError, match=r"'nf4' \(bitsandbytes\), 'none' \(no quantization\)"):
        register_backend(clash)
    with pytest.raises(TypeError, match="QuantizationBackend"):
        register_backend(object())
    assert [backend.name for backend in BACKENDS] == ["bitsandbytes", "fake"]


def test_without_registration_the_fake_kind_is_unknown():
    assert [backend.name for backend in BACKENDS] == ["bitsandbytes"]
    assert quantization_kind(FakeQuantLinear(torch.nn.Linear(4, 4))) is None
    with pytest.raises(ValueError, match="`quantization` must be one of"):
        DynamicRankMetadata(max_rank=4, quantization="fake4")


# The real proof: QuAILoRA on a base of the new backend


def test_quailora_init_corrects_a_fake_quantized_base(fake_backend, tiny_model_path, tiny_texts, tmp_path):
    full = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    model = fake_lora(tiny_model_path).eval()
    assert model_quantization(model) == "fake4"
    assert base_quantization(layer for layer in model.modules() if isinstance(layer, LoraLinear)) == "fake4"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = tokenizer(tiny_texts[:4], return_tensors="pt", padding=True)["input_ids"]

    def distance():
        with torch.no_grad():
            return float((model(input_ids=ids).logits - full(input_ids=ids).logits).pow(2).mean())

    before = distance()  # the B = 0 start: the fake-quantized model itself
    report = quailora_init(model, tiny_texts, QuAILoRAConfig(show_progress=False), tokenizer=tokenizer)
    after = distance()
    assert after < 0.5 * before, (before, after)
    assert len(report.layers) == TINY_LINEAR_LAYERS and not report.skipped
    for layer in report.layers:
        assert layer.quantization == "fake4", layer.name
        assert layer.calibrated_error_result < layer.calibrated_error_qlora, layer.name
    assert all(layer.prepared == 1 for layer in model.modules() if isinstance(layer, FakeQuantLinear))
    assert prepare_for_exact_weights(model) == TINY_LINEAR_LAYERS
    # dynamic_rank.json records the new kind, and loading by name says the loader cannot build that base
    model.save_pretrained(tmp_path / "adapter")
    DynamicRankMetadata.for_model(model, max_rank=4).save(tmp_path / "adapter")
    assert DynamicRankMetadata.load(tmp_path / "adapter").quantization == "fake4"
    with pytest.raises(ValueError, match="needs a 'fake4' base, which load_quantized_model cannot load"):
        load_dynamic_rank_adapter(tiny_model_path, tmp_path / "adapter")
