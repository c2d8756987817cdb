"""The GPU's usual QLoRA dtypes, run on the CPU: NF4 with `bnb_4bit_compute_dtype=bfloat16`, trl's bf16 adapters and
`bf16=True` training. Calibration, the QuAILoRA start and one dynamic-rank step go through this path here, so that
a user's GPU is not the first place it runs."""

import torch
from datasets import Dataset
from peft import LoraConfig

from hf_quailora import DynamicRankConfig, DynamicRankTrainer, QuAILoRAInitCallback
from hf_quailora.quantization import load_quantized_model

from testing_utils import one_thread, require_bitsandbytes  # noqa: F401 (autouse fixture)


@require_bitsandbytes
def test_bf16_compute_calibration_init_and_one_training_step(tiny_model_path, tiny_texts, tmp_path):
    model, tokenizer = load_quantized_model(tiny_model_path, "nf4", compute_dtype=torch.bfloat16)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.compute_dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts, calibration_samples=8, calibration_length=24,
                                    show_progress=False)
    args = DynamicRankConfig(
        output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=1, per_device_train_batch_size=4,
        learning_rate=1e-2, logging_steps=1, max_length=32, save_strategy="no", report_to="none", rank_scaling="constant",
        update_rule="nested", gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
    )
    trainer = DynamicRankTrainer(
        model, args=args, train_dataset=Dataset.from_dict({"text": tiny_texts}), processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        callbacks=[callback],
    )
    lora = {name: param for name, param in trainer.model.named_parameters() if "lora_" in name}
    assert {param.dtype for param in lora.values()} == {torch.bfloat16}  # trl casts QLoRA adapters to bf16
    initialised = {}
    trainer.add_callback(_Snapshot(lora, initialised))
    trainer.train()
    report = callback.report
    assert len(report.layers) == 14 and not report.skipped
    for layer in report.layers:  # the calibrated start (solved in float64, then written into the bf16 factors)
        assert layer.calibrated_error_result < 0.9 * layer.calibrated_error_qlora, layer.name
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 1 and losses and all(torch.isfinite(torch.tensor(losses)))
    changed = [name for name, param in lora.items() if not torch.equal(param, initialised[name])]
    assert changed and all(torch.isfinite(lora[name]).all() for name in changed)


class _Snapshot:
    """A callback that keeps the LoRA factors as training begins, after QuAILoRA wrote them."""

    def __init__(self, params: dict, into: dict):
        self.params, self.into = params, into

    def __getattr__(self, event):  # every other TrainerCallback event: nothing to do
        return lambda *args, **kwargs: None

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.into:
            self.into.update({name: param.detach().clone() for name, param in self.params.items()})
