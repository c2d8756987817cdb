"""QuAILoRA on the real SmolLM2-135M-Instruct in NF4 (the embedded model; slow, runs in CI)."""

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from hf_quailora import QuAILoRAConfig, QuAILoRAInitCallback, compute_perplexity, make_token_windows, quailora_init
from hf_quailora.embedded.data import load_alpaca_sft
from hf_quailora.quantization import load_quantized_model

from testing_utils import require_bitsandbytes


pytestmark = [pytest.mark.slow, require_bitsandbytes]


def test_quailora_start_beats_qlora_and_svd_starts_on_held_out_text(smollm2_path, embedded_texts):
    model, tokenizer = load_quantized_model(smollm2_path, "nf4")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    calibration = make_token_windows(tokenizer, embedded_texts["c4"], 256, 8)  # C4: calibration
    held_out = make_token_windows(tokenizer, embedded_texts["wiki"], 256, 4)  # Wikipedia: held out
    with model.disable_adapter():
        qlora = compute_perplexity(model, held_out)  # B = 0 is the quantized model itself
    quailora_init(model, None, QuAILoRAConfig(solver="svd", show_progress=False))
    svd = compute_perplexity(model, held_out)
    report = quailora_init(model, calibration, QuAILoRAConfig(show_progress=False, report_svd_baseline=True))
    quailora = compute_perplexity(model, held_out)
    assert quailora < svd and quailora < qlora, (qlora, svd, quailora)
    assert quailora < qlora * 0.97  # a clear gain, not rounding (measured: 12% lower at these sizes)
    totals = report.totals()
    assert totals["calibrated_error_result"] < totals["calibrated_error_svd"] < totals["calibrated_error_qlora"]


def test_streamed_init_gives_the_all_at_once_factors_on_the_real_model(smollm2_path, embedded_texts):
    model, tokenizer = load_quantized_model(smollm2_path, "nf4")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"],
                                             lora_dropout=0.0))
    calibration = make_token_windows(tokenizer, embedded_texts["c4"], 128, 4)
    factors = {}
    for streaming in ("off", "replay"):
        report = quailora_init(model, calibration, QuAILoRAConfig(show_progress=False, streaming=streaming))
        assert report.streaming == streaming and report.gram_statistics is None
        factors[streaming] = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    assert len(factors["off"]) == 2 * 3 * model.config.num_hidden_layers
    for name, value in factors["off"].items():
        torch.testing.assert_close(factors["replay"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def _first_losses(smollm2_path, tmp_path, callback, steps=3):
    model, tokenizer = load_quantized_model(smollm2_path, "nf4")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             lora_dropout=0.0))
    data = load_alpaca_sft(num_examples=24)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, max_length=128,
                     bf16=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
                     learning_rate=2e-4, seed=0, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[callback] if callback else None)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = sum(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters() if p.requires_grad)
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], moved


def test_callback_in_sfttrainer_lowers_the_first_step_loss_and_trains(smollm2_path, embedded_texts, tmp_path):
    qlora_losses, _ = _first_losses(smollm2_path, tmp_path / "qlora", None)
    # QuAILoRA's start was chosen before training begins; trl then trains those very Parameters.
    callback = QuAILoRAInitCallback(calibration_dataset=datasets.Dataset.from_dict({"text": embedded_texts["c4"]}),
                                    calibration_samples=8, calibration_length=128)
    quailora_losses, moved = _first_losses(smollm2_path, tmp_path / "quailora", callback)
    # The same first batch (same seed): a start closer to full precision gives a lower loss.
    assert quailora_losses[0] < qlora_losses[0], (qlora_losses, quailora_losses)
    assert all(torch.isfinite(torch.tensor(quailora_losses)))
    assert moved == 2 * 3 * 30  # every lora_A/lora_B of q, v, down in 30 layers trained
