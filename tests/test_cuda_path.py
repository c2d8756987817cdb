"""The CUDA path, end to end on the tiny Llama: bitsandbytes' GPU kernels, bf16 compute, trl's bf16 adapters, a paged
8-bit optimizer and gradient checkpointing, as `recipes/configs/alpaca_gpu.yaml` trains. The same code as the CPU
path (`tests/test_bf16_compute.py`); only the device differs. Skipped without a CUDA GPU (CI has none). On a GPU:
`pytest tests/test_cuda_path.py` (`bench/gpu_check.sh` runs it with the GPU memory benchmark).

Each test also checks the GPU against the CPU where both must agree: the NF4 weight `Q` that QuAILoRA corrects, the
calibrated start, an exported rank reloaded as a plain peft adapter."""

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model

from hf_quailora import (
    DynamicRankConfig,
    DynamicRankTrainer,
    QuAILoRAConfig,
    QuAILoRAInitCallback,
    compute_perplexity,
    export_rank,
    quailora_init,
    use_rank,
)
from hf_quailora.quantization import dequantize_weight, load_quantized_model

from testing_utils import TINY_LINEAR_LAYERS, require_bitsandbytes, require_cuda


pytestmark = [require_cuda, require_bitsandbytes]

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def _calibration(tokenizer, texts, length=24):
    ids = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=length)
    return ids["input_ids"][:8]


def test_the_default_load_is_nf4_on_the_gpu_with_bf16_compute_and_q_equals_the_cpus(tiny_model_path):
    gpu, _ = load_quantized_model(tiny_model_path, "nf4")  # defaults: the current CUDA device, bf16 compute
    # the same dtype on both: the weights are cast to it before they are quantized (float32 gives other codes)
    cpu, _ = load_quantized_model(tiny_model_path, "nf4", compute_dtype=torch.bfloat16, device_map="cpu")
    for name in LAYERS:
        layer_gpu, layer_cpu = gpu.get_submodule(name), cpu.get_submodule(name)
        assert layer_gpu.weight.device.type == "cuda" and layer_gpu.compute_dtype == torch.bfloat16
        Q_gpu, Q_cpu = dequantize_weight(layer_gpu).cpu(), dequantize_weight(layer_cpu)
        # bitsandbytes' CUDA and CPU kernels quantize the same block-64 NF4 codes with double-quantized scales
        differing = (Q_gpu != Q_cpu).float().mean().item()
        relative = ((Q_gpu - Q_cpu).norm() / Q_cpu.norm()).item()
        print(f"{name}: {differing:.2%} of Q differs between GPU and CPU, relative difference {relative:.2e}")
        assert relative < 1e-3, (name, differing, relative)


def test_quailora_start_on_the_gpu_matches_the_cpus(tiny_model_path, tiny_texts):
    reports = {}
    for device in ("cuda", "cpu"):
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model, tokenizer = load_quantized_model(tiny_model_path, "nf4", compute_dtype=dtype,
                                                device_map={"": 0} if device == "cuda" else "cpu")
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
        config = QuAILoRAConfig(calibration_samples=None, calibration_batch_size=4, show_progress=False)
        reports[device] = quailora_init(model, _calibration(tokenizer, tiny_texts), config)
        lora_B = model.get_submodule("base_model.model." + LAYERS[0]).lora_B["default"].weight
        assert lora_B.device.type == device and lora_B.abs().sum() > 0
    gpu = {layer.name: layer for layer in reports["cuda"].layers}
    cpu = {layer.name: layer for layer in reports["cpu"].layers}
    assert len(gpu) == len(cpu) == TINY_LINEAR_LAYERS
    for name, layer in gpu.items():
        kept_gpu = layer.calibrated_error_result / layer.calibrated_error_qlora
        kept_cpu = cpu[name].calibrated_error_result / cpu[name].calibrated_error_qlora
        # bf16 activations on the GPU against float32 on the CPU: the Gram matrices differ by bf16's rounding only
        assert kept_gpu < 0.9 and abs(kept_gpu - kept_cpu) < 0.05, (name, kept_gpu, kept_cpu)


def test_dynamic_rank_training_with_quailora_paged_8bit_adam_and_checkpointing_then_export(
    tiny_model_path, tiny_texts, tmp_path
):
    model, tokenizer = load_quantized_model(tiny_model_path, "nf4")
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts, calibration_samples=8, calibration_length=24,
                                    show_progress=False)
    args = DynamicRankConfig(
        output_dir=str(tmp_path / "run"), bf16=True, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, max_length=32, save_strategy="no", report_to="none", rank_scaling="constant",
        update_rule="nested", optim="paged_adamw_8bit", gradient_checkpointing=True, dataloader_num_workers=0, seed=0,
    )
    trainer = DynamicRankTrainer(
        model, args=args, train_dataset=Dataset.from_dict({"text": tiny_texts}), processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0), callbacks=[callback],
    )
    lora = {name: param for name, param in trainer.model.named_parameters() if "lora_" in name}
    assert {param.device.type for param in lora.values()} == {"cuda"}
    trainer.train()
    assert len(callback.report.layers) == TINY_LINEAR_LAYERS and not callback.report.skipped
    for layer in callback.report.layers:
        assert layer.calibrated_error_result < 0.9 * layer.calibrated_error_qlora, layer.name
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 4 and len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(param).all() for param in lora.values())

    # rank 2 in memory against rank 2 exported as a plain peft adapter and reloaded on a fresh NF4 base
    ids = _calibration(tokenizer, tiny_texts, length=16)[:4].cuda()
    trainer.model.eval()
    with torch.no_grad(), use_rank(trainer.model, 2):
        expected = trainer.model(input_ids=ids).logits.float()
    folder = export_rank(trainer.model, 2, str(tmp_path / "rank2"))
    base, _ = load_quantized_model(tiny_model_path, "nf4")
    plain = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        got = plain(input_ids=ids).logits.float()
    # trl trains bf16 adapters; the export reloads in float32 (README, "Known limits"): bf16 rounding only
    assert (got - expected).abs().max() < 0.05 * expected.abs().max(), (got - expected).abs().max()
    ppl = compute_perplexity(plain, ids, batch_size=2)
    assert torch.isfinite(torch.tensor(ppl)) and ppl > 1


def test_int8_base_on_the_gpu_takes_the_quailora_start(tiny_model_path, tiny_texts):
    model, tokenizer = load_quantized_model(tiny_model_path, "int8")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    report = quailora_init(model, _calibration(tokenizer, tiny_texts),
                           QuAILoRAConfig(calibration_samples=None, calibration_batch_size=4, show_progress=False))
    assert len(report.layers) == TINY_LINEAR_LAYERS
    for layer in report.layers:
        assert layer.calibrated_error_result < layer.calibrated_error_qlora, layer.name
