"""The first step of a QuAILoRA start in what the model predicts, and the learning-rate rule on it
(quailora/first_step.py): against a real AdamW step, and applied by QuAILoRAInitCallback inside a real trl SFTTrainer
(tiny quantized Llama)."""

import pytest
import torch
from transformers import TrainerControl, TrainerState

from hf_quailora import QuAILoRAConfig, QuAILoRAInitCallback, quailora_first_step, quailora_init, quailora_lr_scale
from hf_quailora.quailora.calibration import make_calibration_batches
from hf_quailora.quailora.first_step import DEFAULT_BUDGET, TooFewSequencesError, parse_lr_scale, scale_learning_rate

from .test_step_ratio import fresh
from testing_utils import require_bitsandbytes


pytestmark = require_bitsandbytes


@pytest.fixture(scope="module")
def start(tiny_model_path, tiny_texts):
    model, tokenizer = fresh(tiny_model_path)
    quailora_init(model, tiny_texts, QuAILoRAConfig(calibration_samples=8, calibration_length=32, show_progress=False),
                  tokenizer=tokenizer)
    return model, make_calibration_batches(tiny_texts, tokenizer, 8, 32)


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def kl_after_adam_step(model, batches, lr):
    """KL(start ‖ after one real torch AdamW step on the even sequences) on the odd ones, adapter restored."""
    from hf_quailora.quailora.first_step import _kl_sum, _log_probs, _sequences

    saved = adapter_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sequences = _sequences(batches, 8, params[0].device)
    model.eval()
    starts = [_log_probs(model, s).detach() for s in sequences[1::2]]
    loss = sum(torch.nn.functional.cross_entropy(model(**s).logits[0, :-1].float(), s["input_ids"][0, 1:],
                                                 reduction="sum") for s in sequences[0::2])
    loss.backward()
    torch.optim.AdamW(params, lr=lr, weight_decay=0.0, eps=1e-30).step()
    with torch.no_grad():
        total = sum(_kl_sum(ref, _log_probs(model, s)) for ref, s in zip(starts, sequences[1::2]))
        model.load_state_dict(saved, strict=False)
    for p in params:
        p.grad = None
    return total / sum(ref.shape[0] for ref in starts)


def test_first_step_is_adams_first_step_and_leaves_the_adapter(start):
    model, batches = start
    before = adapter_state(model)
    scalings = [dict(m.scaling) for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    step = quailora_first_step(model, batches, 1e-3, scales=(1.0, 0.5))
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training  # restored exactly
    assert scalings == [dict(m.scaling) for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: nothing accumulated
    # padding on the left gives the same sequences, so the same numbers
    left = []
    for batch in batches:
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
        for row in range(ids.shape[0]):
            keep = int(mask[row].sum())
            ids[row] = torch.cat([ids[row][~mask[row].bool()], ids[row][mask[row].bool()]])
            mask[row] = torch.cat([torch.zeros(ids.shape[1] - keep, dtype=mask.dtype), torch.ones(keep, dtype=mask.dtype)])
        left.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    assert quailora_first_step(model, left, 1e-3, scales=(1.0, 0.5)).step_kl == pytest.approx(step.step_kl, rel=1e-4)
    assert step.correction_kl > 0 and step.tokens > 0
    assert step.step_kl[1.0] == pytest.approx(kl_after_adam_step(model, batches, 1e-3), rel=0.02)
    # a small step: KL grows with the square of the rate
    assert 3.0 < step.step_kl[1.0] / step.step_kl[0.5] < 5.0
    assert step.ratio(1.0) == pytest.approx(step.step_kl[1.0] / step.correction_kl)


def test_lr_scale_is_the_largest_halving_within_the_budget(start):
    model, batches = start
    scale, step = quailora_lr_scale(model, batches, 1e-3, budget=1e6)
    assert scale == 1.0 and sorted(step.step_kl) == [0.125, 0.25, 0.5, 1.0]
    scale, _ = quailora_lr_scale(model, batches, 1e-3, budget=1e-12, min_scale=0.25)
    assert scale == 0.25  # nothing fits: the smallest allowed
    budget = step.ratio(0.5) * 1.01  # 0.5 fits, 1 does not
    assert step.ratio(1.0) > budget
    assert quailora_lr_scale(model, batches, 1e-3, budget=budget)[0] == 0.5


def test_first_step_refuses_bad_input_before_any_forward(start):
    model, batches = start
    for bad in (0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="learning_rate"):
            quailora_first_step(model, batches, bad)
    with pytest.raises(ValueError, match="scales"):
        quailora_first_step(model, batches, 1e-3, scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="budget"):
        quailora_lr_scale(model, batches, 1e-3, budget=0)
    with pytest.raises(ValueError, match="min_scale"):
        quailora_lr_scale(model, batches, 1e-3, min_scale=2)
    one_token = [{"input_ids": torch.tensor([[5], [6]]), "attention_mask": torch.tensor([[1], [1]])}]
    one_sequence = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]])}]
    for batches_ in (one_token, one_sequence):
        with pytest.raises(TooFewSequencesError, match="at least two calibration sequences"):
            quailora_first_step(model, batches_, 1e-3)
    with pytest.raises(ValueError, match="LoRA"):
        quailora_first_step(torch.nn.Linear(2, 2), batches, 1e-3)


def sft_trainer(path, texts, tmp_path, lr_scale, learning_rate=1e-2):
    import datasets
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = fresh(path)
    data = datasets.Dataset.from_dict({"prompt": [t[:20] for t in texts], "completion": [t[20:] for t in texts]})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_length=64, bf16=False,
                     use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", learning_rate=learning_rate,
                     lr_scheduler_type="constant", seed=0)
    callback = QuAILoRAInitCallback(calibration_dataset=texts, calibration_samples=8, calibration_length=32,
                                    lr_scale=lr_scale, report_file=None)
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback]), callback


@pytest.mark.parametrize("lr_scale", ["auto", "1", "0.25"])
def test_callback_scales_the_learning_rate_of_the_run(tiny_model_path, tiny_texts, tmp_path, lr_scale, caplog):
    trainer, callback = sft_trainer(tiny_model_path, tiny_texts, tmp_path, lr_scale)
    with caplog.at_level("INFO", logger="hf_quailora.quailora.callback"):
        trainer.train()
    if lr_scale == "auto":  # at 1e-2 the tiny model's first step is far beyond its correction: the rule halves
        step = callback.first_step
        assert callback.lr_scale < 1 and step.ratio(callback.lr_scale) <= DEFAULT_BUDGET < step.ratio(2 * callback.lr_scale)
        assert "lr_scale='auto'" in caplog.text and f"learning rate x {callback.lr_scale:g}" in caplog.text
    else:
        assert callback.lr_scale == float(lr_scale) and callback.first_step is None
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx([1e-2 * callback.lr_scale] * 2)
    assert trainer.lr_scheduler.base_lrs == pytest.approx([1e-2 * callback.lr_scale] * len(trainer.optimizer.param_groups))
    assert trainer.args.learning_rate == 1e-2  # the arguments (and so a saved config) keep what the user asked for


def test_callback_keeps_the_rate_when_too_little_calibration_data(tiny_model_path, tiny_texts, tmp_path, caplog):
    trainer, callback = sft_trainer(tiny_model_path, tiny_texts[:1], tmp_path, "auto")
    with caplog.at_level("WARNING", logger="hf_quailora.quailora.callback"):
        trainer.train()
    assert callback.lr_scale == 1.0 and callback.first_step is None and "keeps the learning rate" in caplog.text
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-2


def test_a_second_train_call_does_not_scale_the_rate_twice(tiny_model_path, tiny_texts, tmp_path):
    trainer, callback = sft_trainer(tiny_model_path, tiny_texts, tmp_path, "0.25")
    trainer.train()
    trainer.train()  # the same optimizer (its groups marked), a new scheduler from their initial rates
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert trainer.lr_scheduler.base_lrs == pytest.approx([1e-2 * 0.25] * len(trainer.optimizer.param_groups))


def test_scale_learning_rate_follows_plateau_schedulers_and_marks_groups():
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    assert scale_learning_rate(optimizer, plateau, 0.5) and optimizer.param_groups[0]["lr"] == 0.5
    assert not scale_learning_rate(optimizer, plateau, 0.5) and optimizer.param_groups[0]["lr"] == 0.5  # once


def test_lr_scale_is_not_applied_on_a_resume_and_bad_values_fail_early(tiny_model_path, tiny_texts):
    model, tokenizer = fresh(tiny_model_path)
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    state = TrainerState()
    state.global_step = 5  # resuming: the checkpoint's optimizer and scheduler already hold the scaled rates
    QuAILoRAInitCallback(calibration_dataset=tiny_texts, lr_scale=0.5).on_train_begin(
        None, state, TrainerControl(), model=model, processing_class=tokenizer, optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == 1.0

    assert QuAILoRAConfig().lr_scale == "auto"
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
