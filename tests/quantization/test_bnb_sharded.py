"""The bitsandbytes helpers on a 4-bit layer whose weight lost its quant state, as a sharded weight does (FSDP2
replaces it by a `DTensor`, FSDP1 by a flat parameter): they read the copy bitsandbytes keeps on the module.
The two-process FSDP2 NF4 run is in tests/dynamic_rank/test_trainer_sharded.py."""

import torch

from hf_quailora.quantization import dequantize_weight, disable_bnb_cpu_fast_path, quantization_kind

from testing_utils import require_bitsandbytes


@require_bitsandbytes
def test_quant_state_read_from_the_module_when_the_weight_lost_it():
    from tests.test_quantization import make_4bit_layer

    layer, _ = make_4bit_layer("nf4", 64, True)
    Q = dequantize_weight(layer)
    assert layer.quant_state is layer.weight.quant_state  # bitsandbytes' own copy on the module
    layer.weight = torch.nn.Parameter(layer.weight.data.clone(), requires_grad=False)  # a plain tensor, no state
    assert getattr(layer.weight, "quant_state", None) is None
    assert quantization_kind(layer) == "nf4"
    torch.testing.assert_close(dequantize_weight(layer), Q, rtol=0, atol=0)
    assert disable_bnb_cpu_fast_path(layer) == 1
