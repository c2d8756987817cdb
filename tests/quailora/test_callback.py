"""QuAILoRAInitCallback inside a real trl SFTTrainer (tiny quantized Llama on the CPU)."""

import json
import os

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl, TrainerState
from trl import SFTConfig, SFTTrainer

from hf_quailora import QuAILoRAConfig, QuAILoRAInitCallback, quailora_init
from hf_quailora.quantization import load_quantized_model

from testing_utils import TINY_LINEAR_LAYERS, require_bitsandbytes, snapshot, tensor_bytes


pytestmark = require_bitsandbytes


def lora_model(path, quantization="nf4"):
    model, tokenizer = load_quantized_model(path, quantization)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)), tokenizer


def sft_data(texts):
    return datasets.Dataset.from_dict({"prompt": [t[:20] for t in texts], "completion": [t[20:] for t in texts]})


def sft_args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_length=64,
                    bf16=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
                    learning_rate=1e-2, seed=0)
    return SFTConfig(**{**defaults, **kwargs})


def test_callback_initialises_then_trains_the_same_parameters(tiny_model_path, tiny_texts, tmp_path):
    # Reference: quailora_init on an identical fresh model with the same calibration data.
    reference_model, tokenizer = lora_model(tiny_model_path)
    quailora_init(reference_model, tiny_texts, QuAILoRAConfig(calibration_samples=8, calibration_length=32, show_progress=False),
                  tokenizer=tokenizer)
    reference = snapshot(reference_model)

    # learning rate 0: after "training" the weights are exactly the callback's initialisation
    model, tokenizer = lora_model(tiny_model_path)
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts, calibration_samples=8, calibration_length=32)
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path / "lr0", learning_rate=0.0),
                         train_dataset=sft_data(tiny_texts), processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    for name, value in snapshot(model).items():
        # trl stores QLoRA adapters in bf16 (sft_trainer.py); the callback writes into whatever dtype they have.
        torch.testing.assert_close(value, reference[name].to(value.dtype), msg=name)
    assert callback.report is not None and len(callback.report.layers) == TINY_LINEAR_LAYERS
    saved = json.loads((tmp_path / "lr0" / "quailora_report.json").read_text())
    assert len(saved["layers"]) == TINY_LINEAR_LAYERS and saved["solver"] == "closed_form"

    # learning rate > 0: the optimizer moves the very Parameters the callback wrote into
    model, tokenizer = lora_model(tiny_model_path)
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path / "lr"), train_dataset=sft_data(tiny_texts),
                         processing_class=tokenizer,
                         callbacks=[QuAILoRAInitCallback(calibration_dataset=tiny_texts, calibration_samples=8, calibration_length=32)])
    trainer.train()
    optimizer_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    after = snapshot(model)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert id(param) in optimizer_params, name
            assert not torch.equal(after[name], reference[name].to(param.dtype)), f"{name} did not train"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_callback_calibrates_from_the_train_dataloader(tiny_model_path, tiny_texts, tmp_path):
    model, tokenizer = lora_model(tiny_model_path)
    before = snapshot(model)
    callback = QuAILoRAInitCallback(calibration_samples=4, report_file=None)
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path, learning_rate=0.0), train_dataset=sft_data(tiny_texts),
                         processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    assert callback.report.num_tokens > 0
    assert not os.path.exists(tmp_path / "quailora_report.json")
    changed = [n for n, v in snapshot(model).items() if "lora_B" in n and not torch.equal(v, before[n])]
    assert len(changed) == TINY_LINEAR_LAYERS


def test_callback_keeps_checkpoint_weights_on_resume(tiny_model_path, tiny_texts, tmp_path):
    model, tokenizer = lora_model(tiny_model_path)
    before = snapshot(model)
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts)
    state = TrainerState()
    state.global_step = 5
    callback.on_train_begin(sft_args(tmp_path), state, TrainerControl(), model=model, processing_class=tokenizer)
    assert callback.report is None
    for name, value in snapshot(model).items():
        assert torch.equal(value, before[name])


def test_callback_keeps_the_report_numbers_not_the_gram_matrices(tiny_model_path, tiny_texts, tmp_path):
    model, tokenizer = lora_model(tiny_model_path)
    before = tensor_bytes()
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts, report_file=None)
    callback.on_train_begin(sft_args(tmp_path), TrainerState(), TrainerControl(), model=model, processing_class=tokenizer)
    assert callback.report.gram_statistics is None and len(callback.report.layers) == TINY_LINEAR_LAYERS
    assert tensor_bytes() == before  # no Gram matrix, W, Q or E outlives on_train_begin


def test_callback_bad_input(tiny_model_path, tiny_texts, tmp_path):
    with pytest.raises(ValueError, match="solver"):
        QuAILoRAInitCallback(solver="nope")
    with pytest.raises(ValueError, match="empty"):
        QuAILoRAInitCallback(calibration_dataset=[])
    with pytest.raises(TypeError, match="QuAILoRAConfig"):
        QuAILoRAInitCallback(config={"solver": "als"})
    model, tokenizer = load_quantized_model(tiny_model_path, "nf4")  # no LoRA
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts)
    with pytest.raises(ValueError, match="no LoRA layers"):
        callback.on_train_begin(sft_args(tmp_path), TrainerState(), TrainerControl(), model=model,
                                processing_class=tokenizer)


def test_callback_refuses_a_dataset_name_or_float_calibration_when_made():
    with pytest.raises(TypeError, match=r"not a name; .* pass load_dataset_any\('c4'\)"):
        QuAILoRAInitCallback(calibration_dataset="c4")
    with pytest.raises(TypeError, match="must be integer token ids"):
        QuAILoRAInitCallback(calibration_dataset=torch.rand(4, 16))


def test_callback_takes_quailora_config_fields_as_overrides_and_no_defaults_of_its_own():
    default = QuAILoRAInitCallback().config
    assert default == QuAILoRAConfig()  # the config's own defaults, not a second copy
    callback = QuAILoRAInitCallback(config=QuAILoRAConfig(solver="als", damping=1e-2), calibration_samples=4)
    assert (callback.config.solver, callback.config.damping, callback.config.calibration_samples) == ("als", 1e-2, 4)
    with pytest.raises(TypeError, match="unknown settings \\['num_sample'\\]"):
        QuAILoRAInitCallback(num_sample=4)


def test_the_quailora_subpackage_knows_nothing_of_dynamic_rank():
    import hf_quailora.quailora as package

    folder = os.path.dirname(package.__file__)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as file:
                assert "dynamic_rank" not in file.read(), f"quailora/{name} mentions dynamic_rank"
