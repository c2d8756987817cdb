"""The family matrix: every piece of hf_quailora on a tiny random model of each family, on an NF4 base.

Per family: (1) `quailora_init` (closed form) reaches the optimum of the calibrated objective on every initialised
layer, against a reference computed here from W (transformers' own full-precision load), Q (bitsandbytes'
dequantization) and H (hooks of this test); (2) `use_rank` + `export_rank`, read back by vanilla
`PeftModel.from_pretrained`; (3) `evaluate_ranks` on an offline task; (4) one `DynamicRankTrainer` step. Falcon,
which transformers does not quantize, is refused by name and runs the dynamic-rank pieces on its full-precision base.
"""

from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_quailora import QuAILoRAConfig, evaluate_ranks, export_rank, quailora_init, use_rank
from hf_quailora._peft_utils import find_lora_layers
from hf_quailora.quantization import load_quantized_model, quantization_kind

from .family_models import FAMILIES, FAMILY_BY_NAME
from testing_utils import make_trainer, one_thread, require_bitsandbytes  # noqa: F401 (autouse fixture)


pytestmark = require_bitsandbytes

R, ALPHA = 4, 8  # scaling 2: the solver's product must be split by s


@dataclass
class Initialised:
    name: str
    path: str
    model: torch.nn.Module
    tokenizer: object
    report: object  # QuAILoRAReport, or None for a family that cannot be quantized
    grams: dict  # layer name -> this test's own H = XᵀX of the layer's input (float64)


def calibration_ids(vocab: int) -> torch.Tensor:
    """16 windows of 24 token ids (384 tokens, more than any layer's input width): every token counts."""
    return torch.randint(4, vocab, (16, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def collect_grams(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """H of every LoRA layer's input in the quantized model with adapters disabled, from forward pre-hooks here."""
    grams, handles = {}, []
    for name, layer in find_lora_layers(model).items():
        def hook(module, args, name=name):
            rows = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + rows.T @ rows

        handles.append(layer.get_base_layer().register_forward_pre_hook(hook))
    model.eval()
    try:
        with model.disable_adapter():
            for batch in ids.split(8):
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


@pytest.fixture(scope="module", params=[family.name for family in FAMILIES])
def initialised(request, family_path) -> Initialised:
    """The family's model in NF4 with LoRA r=4, QuAILoRA-initialised (closed form); Falcon: full precision with
    random LoRA factors (transformers does not quantize it, so there is nothing to initialise)."""
    family = FAMILY_BY_NAME[request.param]
    path = family_path(family.name)
    model, tokenizer = load_quantized_model(path, "nf4" if family.quantized else "none")
    torch.manual_seed(0)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=family.target_modules, lora_dropout=0.0,
                      init_lora_weights=family.quantized)
    model = get_peft_model(model, lora)
    assert len(find_lora_layers(model)) == family.num_lora_layers
    if not family.quantized:
        return Initialised(family.name, path, model, tokenizer, None, {})
    ids = calibration_ids(len(tokenizer))
    grams = collect_grams(model, ids)
    config = QuAILoRAConfig(solver="closed_form", show_progress=False, calibration_batch_size=8)
    report = quailora_init(model, ids, config)
    return Initialised(family.name, path, model, tokenizer, report, grams)


def _root(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix, by eigendecomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def test_closed_form_reaches_the_calibrated_optimum_on_every_layer(initialised):
    if initialised.report is None:
        pytest.skip(f"{initialised.name}: transformers does not quantize its layers (test_falcon_is_refused_by_name)")
    import bitsandbytes.functional as bnb_functional

    full_precision = AutoModelForCausalLM.from_pretrained(initialised.path, dtype=torch.float32).state_dict()
    layers = find_lora_layers(initialised.model)
    quantized = [name for name, layer in layers.items() if quantization_kind(layer.get_base_layer())]
    assert [layer.name for layer in initialised.report.layers] == quantized
    assert set(initialised.report.skipped) == set(layers) - set(quantized)
    for name in quantized:
        layer, base = layers[name], layers[name].get_base_layer()
        W = full_precision[f"{name.removeprefix('base_model.model.')}.weight"].double()
        Q = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
        E = W - Q
        M = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        # min over rank-r M of tr[(E − M) H (E − M)ᵀ] = ‖E H^½‖² − (sum of its r largest squared singular values)
        root = _root(initialised.grams[name])
        singular = torch.linalg.svdvals(E @ root)
        start = float(singular.pow(2).sum())
        best = start - float(singular[:R].pow(2).sum())
        achieved = float(((E - M) @ root).pow(2).sum())
        assert best < 0.999 * start, name  # the quantization error is worth correcting
        assert achieved - best <= 1e-4 * (start - best), (name, achieved, best, start)


@pytest.fixture
def input_ids(initialised):
    return torch.randint(4, len(initialised.tokenizer), (2, 12), generator=torch.Generator().manual_seed(2))


def test_use_rank_and_export_rank_round_trip_through_vanilla_peft(initialised, input_ids, tmp_path):
    model, family = initialised.model, FAMILY_BY_NAME[initialised.name]
    model.eval()
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        with use_rank(model, 2, rank_scaling="constant", update_rule="frozen"):
            truncated = model(input_ids=input_ids).logits
    assert not torch.allclose(full, truncated, atol=1e-6)  # rank 2 is a different model from rank 4
    export_rank(model, 2, str(tmp_path / "rank-2"), rank_scaling="constant")
    base, _ = load_quantized_model(initialised.path, "nf4" if family.quantized else "none")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "rank-2")).eval()
    assert loaded.peft_config["default"].r == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, truncated, rtol=1e-4, atol=1e-4)


def test_evaluate_ranks_on_an_offline_task(initialised):
    rows = evaluate_ranks(initialised.model, initialised.tokenizer, [1, 4], "quailora_wiki_ppl", limit=1,
                          max_length=128, rank_scaling="constant", bootstrap_iters=0, show_progress=False)
    values = {row["rank"]: row["value"] for row in rows if row["metric"] == "bits_per_byte"}
    assert set(values) == {1, 4}
    assert all(torch.isfinite(torch.tensor(value)) for value in values.values())
    assert values[1] != values[4]


def test_one_dynamic_rank_training_step(initialised, tiny_texts, tmp_path):
    """Last for each family: it changes the adapter the tests above read."""
    model = initialised.model
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainer = make_trainer(None, tiny_texts, tmp_path, model=(model, initialised.tokenizer), max_steps=1,
                           rank_scaling="constant", update_rule="nested", per_device_train_batch_size=2)
    trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, before[name])]
    assert changed, "no parameter learned"
    assert all("lora_" in name for name in changed), [name for name in changed if "lora_" not in name]
