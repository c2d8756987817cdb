"""The step of a QuAILoRA start (quailora/step_ratio.py): the ratio `quailora_step_ratio` predicts against a measured
Adam step, and the callback's log of it inside a real trl SFTTrainer (tiny quantized Llama)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_quailora import QuAILoRAConfig, QuAILoRAInitCallback, quailora_init, quailora_step_ratio
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


def test_callback_logs_the_step_ratio_of_its_start(tiny_model_path, tiny_texts, tmp_path, caplog):
    import datasets
    from trl import SFTConfig, SFTTrainer

    reference, tokenizer = fresh(tiny_model_path)  # the same start, written by quailora_init directly
    quailora_init(reference, tiny_texts, QuAILoRAConfig(calibration_samples=8, calibration_length=32,
                                                        show_progress=False), tokenizer=tokenizer)
    model, tokenizer = fresh(tiny_model_path)
    data = datasets.Dataset.from_dict({"prompt": [t[:20] for t in tiny_texts], "completion": [t[20:] for t in tiny_texts]})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, max_length=64, bf16=False,
                     use_cpu=True, report_to="none", save_strategy="no", learning_rate=1e-3,
                     lr_scheduler_type="constant", seed=0)
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts, calibration_samples=8, calibration_length=32,
                                    report_file=None, lr_scale=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback])
    with caplog.at_level("INFO", logger="hf_quailora.quailora.callback"):
        trainer.train()
    # trl keeps QLoRA adapters in bf16, so the callback's start is the reference rounded to bf16
    assert callback.step_ratio == pytest.approx(quailora_step_ratio(reference), rel=1e-2)
    assert f"move the LoRA product {callback.step_ratio:.2f}x as far" in caplog.text
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3  # a diagnostic; lr_scale=1 keeps the user's rate


def test_step_ratio_skips_non_linear_lora_layers_and_needs_a_linear_one():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(16, 16)

    for targets, linear in ((["conv", "fc"], True), (["conv"], False)):
        torch.manual_seed(0)
        model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=4, target_modules=targets))
        if linear:
            assert quailora_step_ratio(model) == pytest.approx(1.0, abs=0.3)  # the conv layer is left out
        else:
            with pytest.raises(ValueError, match="no linear LoRA layer"):
                quailora_step_ratio(model)
