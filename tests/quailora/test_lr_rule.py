"""The learning-rate rule of a QuAILoRA start (quailora/lr_rule.py): the step ratio it predicts against a measured
Adam step, and `lr_scale` applied by QuAILoRAInitCallback inside a real trl SFTTrainer (tiny quantized Llama)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl, TrainerState

from hf_quailora import QuAILoRAConfig, QuAILoRAInitCallback, quailora_init, quailora_step_ratio
from hf_quailora.quailora.lr_rule import parse_lr_scale, scale_learning_rate
from hf_quailora.quantization import load_quantized_model

from testing_utils import require_bitsandbytes


pytestmark = require_bitsandbytes


def fresh(path, seed=0, r=8, alpha=8):
    model, tokenizer = load_quantized_model(path, "nf4")
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, config), tokenizer


def product_step(model, ids) -> float:
    """‖ΔW‖_F over every LoRA layer after one AdamW step (lr 1e-3) on `ids`."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]

    def products():
        return [m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach() for m in layers]

    before = products()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return float(sum((after - start).pow(2).sum() for after, start in zip(products(), before)) ** 0.5)


def test_step_ratio_is_one_for_peft_start_and_predicts_the_first_adam_step(tiny_model_path, tiny_texts):
    default, tokenizer = fresh(tiny_model_path)
    # peft's Kaiming-uniform A has ‖A‖² = r/3 in expectation: the ratio of its own start is 1 up to sampling
    assert quailora_step_ratio(default) == pytest.approx(1.0, abs=0.05)
    ids = tokenizer(tiny_texts[:4], return_tensors="pt", padding=True)["input_ids"]
    start, _ = fresh(tiny_model_path)
    quailora_init(start, tiny_texts, QuAILoRAConfig(calibration_samples=8, calibration_length=32, show_progress=False),
                  tokenizer=tokenizer)
    predicted = quailora_step_ratio(start)
    measured = product_step(start, ids) / product_step(default, ids)
    assert predicted != pytest.approx(1.0, abs=0.05)  # the start's factors differ from peft's default
    assert measured == pytest.approx(predicted, rel=0.15)  # SmolLM2-135M, r = 64: 2.223 measured, 2.231 predicted

    # the formula by hand on one layer: s² (d_out ‖A‖² + d_in ‖B‖²) / (s² d_out r / 3)
    one, _ = fresh(tiny_model_path)
    layers = [m for m in one.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    for layer in layers:
        layer.lora_A["default"].weight.data.fill_(0.5)
        layer.lora_B["default"].weight.data.fill_(0.25)
    moved = sum(m.lora_B["default"].out_features * m.lora_A["default"].weight.numel() * 0.25
                + m.lora_A["default"].in_features * m.lora_B["default"].weight.numel() * 0.0625 for m in layers)
    default_sum = sum(m.lora_B["default"].out_features * 8 / 3 for m in layers)
    assert quailora_step_ratio(one) == pytest.approx((moved / default_sum) ** 0.5, rel=1e-6)


def sft_trainer(path, texts, tmp_path, lr_scale, learning_rate=1e-2):
    import datasets
    from trl import SFTConfig, SFTTrainer

    # α = r/16: QuAILoRA's factors carry 1/√s each (s = α/r), so this start moves the product ≈ 4× further than the
    # α = r start (step ratio ≈ 0.4 on this tiny model: "auto" would leave the rate alone there)
    model, tokenizer = fresh(path, r=16, alpha=1)
    data = datasets.Dataset.from_dict({"prompt": [t[:20] for t in texts], "completion": [t[20:] for t in texts]})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_length=64, bf16=False,
                     use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", learning_rate=learning_rate,
                     lr_scheduler_type="constant", seed=0)
    callback = QuAILoRAInitCallback(calibration_dataset=texts, calibration_samples=8, calibration_length=32,
                                    lr_scale=lr_scale, report_file=None)
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback]), callback


@pytest.mark.parametrize("lr_scale", ["1", "0.25", "auto"])
def test_callback_scales_the_learning_rate_of_the_run(tiny_model_path, tiny_texts, tmp_path, lr_scale):
    trainer, callback = sft_trainer(tiny_model_path, tiny_texts, tmp_path, lr_scale)
    trainer.train()
    expected = {"1": 1.0, "0.25": 0.25, "auto": min(1.0, 1 / callback.step_ratio)}[lr_scale]
    if lr_scale == "auto":
        assert callback.step_ratio > 1.05  # the tiny model's start moves further too, so "auto" lowers the rate
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx([1e-2 * expected] * 2)
    assert trainer.lr_scheduler.base_lrs == pytest.approx([1e-2 * expected] * len(trainer.optimizer.param_groups))
    assert trainer.args.learning_rate == 1e-2  # the arguments (and so a saved config) keep what the user asked for


def test_lr_scale_is_not_applied_on_a_resume_and_bad_values_fail_early(tiny_model_path, tiny_texts, tmp_path):
    model, tokenizer = fresh(tiny_model_path)
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    state = TrainerState()
    state.global_step = 5  # resuming: the checkpoint's optimizer and scheduler already hold the scaled rates
    QuAILoRAInitCallback(calibration_dataset=tiny_texts, lr_scale=0.5).on_train_begin(
        None, state, TrainerControl(), model=model, processing_class=tokenizer, optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == 1.0

    for bad in ("fast", "0", -1, float("nan"), True, None):
        with pytest.raises(ValueError, match="'auto'"):
            QuAILoRAConfig(lr_scale=bad)
        with pytest.raises(ValueError, match="'auto'"):
            QuAILoRAInitCallback(lr_scale=bad)
    assert parse_lr_scale(" AUTO ") is None and parse_lr_scale("0.5") == 0.5 and parse_lr_scale(2) == 2.0

    class NoBaseRates:  # e.g. DeepSpeed's own scheduler
        pass

    with pytest.raises(ValueError, match="NoBaseRates.*lr_scale=1"):
        scale_learning_rate(optimizer, NoBaseRates(), 0.5)
    assert optimizer.param_groups[0]["lr"] == 1.0  # nothing changed
