"""DynamicRankTrainer: rank per optimizer step, update rules, SoFT, evaluate, resume, two processes, bad input."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from hf_quailora import DynamicRankConfig, DynamicRankTrainer, use_rank
from hf_quailora.dynamic_rank.truncation import find_dynamic_rank_layers
from hf_quailora.quantization import load_quantized_model

from testing_utils import (  # noqa: F401 (autouse fixture)
    REPO_ROOT,
    SCRIPTS_DIR,
    R,
    make_model,
    make_trainer,
    one_thread,
    require_bitsandbytes,
    snapshot,
)


def lora_weights(model):
    return {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}


class RecordForwardRanks(TrainerCallback):
    """Records (global_step, rank) of every forward of one lora_A module, recomputations included."""

    def __init__(self):
        self.records = []
        self.trainer = None

    def attach(self, trainer):
        self.trainer = trainer
        layer = next(iter(find_dynamic_rank_layers(trainer.model).values()))
        layer.lora_A["default"].register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.trainer.model.training:
            self.records.append((self.trainer.state.global_step, getattr(module, "_dr_rank", None)))


# Config


def test_config_turns_bf16_off_on_a_cpu_machine_unless_set(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only default")
    assert DynamicRankConfig(output_dir=str(tmp_path), report_to="none").bf16 is False


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"min_rank": 0}, ValueError, r"`min_rank` \(0\) must be at least 1"),
        ({"min_rank": 6, "max_rank": 4}, ValueError, r"`min_rank` \(6\) exceeds `max_rank` \(4\)"),
        ({"rank_distribution": "weighted"}, ValueError, "`rank_choices` must be a non-empty"),
        ({"rank_distribution": "weighted", "rank_choices": [1, 2], "rank_weights": [1.0]}, ValueError, "one weight"),
        ({"rank_weights": [1.0, 2.0]}, ValueError, "only used with"),
        ({"update_rule": "partial"}, ValueError, "update_rule"),
        ({"rank_scaling": "alpha"}, ValueError, "rank_scaling"),
        ({"soft_ranks": []}, ValueError, "`soft_ranks` must be a non-empty"),
        ({"soft_weights": [1.0]}, ValueError, "needs `soft_ranks`"),
        ({"eval_ranks": []}, ValueError, "`eval_ranks` is empty"),
        ({"max_rank": 4, "eval_ranks": [1, 8]}, ValueError, "`eval_ranks` holds rank 8"),
        ({"max_rank": 4, "soft_ranks": [2, 5]}, ValueError, "`soft_ranks` holds rank 5"),
        ({"lr_scheduler_type": "constant", "warmup_steps": 30}, ValueError, "constant_with_warmup"),
        ({"lr_scheduler_type": "constant", "warmup_steps": 0.03}, ValueError, r"`warmup_steps` \(0.03\) is ignored"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicRankConfig(output_dir=str(tmp_path), report_to="none", bf16=False, **kwargs)


def test_config_keeps_a_warmup_the_scheduler_applies(tmp_path):
    from transformers.trainer_utils import SchedulerType

    args = DynamicRankConfig(output_dir=str(tmp_path), report_to="none", bf16=False,
                             lr_scheduler_type="constant_with_warmup", warmup_steps=30)
    assert args.lr_scheduler_type == SchedulerType.CONSTANT_WITH_WARMUP and args.warmup_steps == 30
    assert DynamicRankConfig(output_dir=str(tmp_path), report_to="none", bf16=False,
                             lr_scheduler_type="constant").warmup_steps == 0


# Bad input against the model


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"max_rank": 16}, r"`max_rank` \(16\) exceeds the LoRA r of the model \(8\)"),
        ({"min_rank": 9}, r"`min_rank` \(9\) exceeds `max_rank` \(8"),
        ({"eval_ranks": [1, 12]}, "`eval_ranks` holds rank 12"),
        ({"soft_ranks": [4, 10]}, "`soft_ranks` holds rank 10"),
        ({"rank_distribution": "weighted", "rank_choices": [2, 9]}, "`rank_choices` holds rank 9"),
    ],
)
def test_trainer_rejects_ranks_outside_the_lora_r(tiny_model_path, tiny_texts, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tiny_model_path, tiny_texts, tmp_path, **overrides)


def test_trainer_rejects_a_model_without_lora_layers(tiny_model_path, tiny_texts, tmp_path):
    model, tokenizer = load_quantized_model(tiny_model_path, quantization="none")
    with pytest.raises(ValueError, match="no LoRA layers"):
        make_trainer(tiny_model_path, tiny_texts, tmp_path, model=(model, tokenizer))


def test_trainer_rejects_other_args(tiny_model_path, tiny_texts, tmp_path):
    from trl import SFTConfig

    model, tokenizer = make_model(tiny_model_path)
    with pytest.raises(TypeError, match="DynamicRankConfig"):
        DynamicRankTrainer(model, args=SFTConfig(output_dir=str(tmp_path), bf16=False, report_to="none"))


# Training


@pytest.mark.parametrize("rule", ["frozen", "nested"])
def test_update_rule_decides_which_components_learn(tiny_model_path, tiny_texts, tmp_path, rule):
    b = 3  # the only rank drawn
    trainer = make_trainer(
        tiny_model_path, tiny_texts, tmp_path, max_steps=1, optim="sgd", learning_rate=0.1, update_rule=rule,
        rank_distribution="weighted", rank_choices=[b], rank_weights=[1.0],
    )
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.rank_history == [[0, b]]
    changed_any = False
    for name, param in trainer.model.named_parameters():
        if "lora_A" not in name and "lora_B" not in name:
            continue
        delta = (param.detach() - before[name]).abs()
        per_component = delta.sum(dim=1) if "lora_A" in name else delta.sum(dim=0)
        assert torch.all(per_component[b:] == 0), f"{name}: components above rank {b} changed"
        assert per_component[b - 1] > 0, f"{name}: component {b} did not learn"
        if rule == "frozen":
            assert torch.all(per_component[: b - 1] == 0), f"{name}: frozen rule changed components < b"
        else:
            changed_any = changed_any or bool(torch.all(per_component[: b - 1] > 0))
    if rule == "nested":
        assert changed_any, "nested rule left every component < b unchanged"


def test_rank_is_drawn_once_per_optimizer_step_and_logged(tiny_model_path, tiny_texts, tmp_path):
    recorder = RecordForwardRanks()
    trainer = make_trainer(
        tiny_model_path, tiny_texts, tmp_path, max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=3, gradient_checkpointing=True, callbacks=[recorder],
    )
    recorder.attach(trainer)
    trainer.train()
    history = dict(trainer.rank_history)
    assert list(history) == [0, 1, 2]
    assert len(set(history.values())) > 1, "the test needs more than one distinct rank; change the seed"
    per_step = {}
    for step, rank in recorder.records:
        per_step.setdefault(step, []).append(rank)
    for step, ranks in per_step.items():
        # 3 micro-steps, each a forward and (gradient checkpointing) a recomputation, all at the step's rank
        assert len(ranks) == 6, f"step {step}: {len(ranks)} forwards"
        assert set(ranks) == {history[step]}, f"step {step}: forwards at ranks {ranks}, drawn {history[step]}"
    logged = [entry["rank"] for entry in trainer.state.log_history if "loss" in entry and "rank" in entry]
    assert logged == [float(history[step]) for step in range(3)]


def test_rank_seed_defaults_to_seed_and_sets_the_sequence(tiny_model_path, tiny_texts, tmp_path):
    def first_draws(**overrides):
        sampler = make_trainer(tiny_model_path, tiny_texts, tmp_path, **overrides).rank_sampler
        return [sampler.sample() for _ in range(16)]

    assert first_draws(seed=5) == first_draws(seed=5, rank_seed=5)
    assert first_draws(rank_seed=1) != first_draws(rank_seed=2)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resumed_run_equals_uninterrupted_run(tiny_model_path, tiny_texts, tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2)
    full = make_trainer(tiny_model_path, tiny_texts, tmp_path / "full", **common)
    full.train()

    first = make_trainer(tiny_model_path, tiny_texts, tmp_path / "split", callbacks=[StopAt(3)], **common)
    first.train()
    assert first.state.global_step == 3
    checkpoint = tmp_path / "split" / "checkpoint-3"
    assert (checkpoint / "dynamic_rank_state.pt").is_file()
    second = make_trainer(tiny_model_path, tiny_texts, tmp_path / "split", **common)
    second.train(resume_from_checkpoint=str(checkpoint))

    assert second.rank_history == full.rank_history
    assert [rank for _, rank in first.rank_history] == [rank for _, rank in full.rank_history[:3]]
    expected, got = lora_weights(full.model), lora_weights(second.model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_resume_with_another_rank_range_is_refused(tiny_model_path, tiny_texts, tmp_path):
    first = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    other = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=4, max_rank=4)
    with pytest.raises(ValueError, match="rank sampler was written with"):
        other.train(resume_from_checkpoint=True)


def test_resume_from_a_checkpoint_without_rank_state_is_refused(tiny_model_path, tiny_texts, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=2)
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="not written by DynamicRankTrainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_soft_gradient_is_that_of_the_weighted_sum_of_losses(tiny_model_path, tiny_texts, tmp_path):
    ranks, weights, lr = [1, 4, 8], [1.0, 0.5, 2.0], 0.1
    trainer = make_trainer(
        tiny_model_path, tiny_texts, tmp_path, max_steps=1, optim="sgd", learning_rate=lr, max_grad_norm=0.0,
        per_device_train_batch_size=len(tiny_texts), soft_ranks=ranks, soft_weights=weights, update_rule="nested",
        gradient_checkpointing=True,
    )
    batch = next(iter(trainer.get_train_dataloader()))  # the whole data set: order does not change the loss
    before = snapshot(trainer.model)

    reference, _ = make_model(tiny_model_path)
    reference.train()
    loss = 0
    for b, weight in zip(ranks, weights):
        with use_rank(reference, b, update_rule="nested"):
            loss = loss + weight * reference(**batch).loss
    loss.backward()
    expected = {n: before[n] - lr * p.grad for n, p in reference.named_parameters() if p.requires_grad}

    trainer.train()
    for name, param in trainer.model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.detach(), expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert trainer.rank_history == []


# Evaluation


@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=require_bitsandbytes)])
def test_evaluate_reports_every_rank_and_training_continues(tiny_model_path, tiny_texts, tmp_path, quantization):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, quantization=quantization, eval_ranks=[1, 2, 8],
                           max_steps=2)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_loss@r1", "eval_loss@r2", "eval_loss@r8"} <= metrics.keys()
    assert metrics["eval_loss"] == metrics["eval_loss@r8"]
    batch = next(iter(trainer.get_eval_dataloader()))
    trainer.model.eval()
    for b in (1, 2, 8):
        with torch.no_grad(), use_rank(trainer.model, b):
            reference = trainer.model(**batch).loss.item()
        assert metrics[f"eval_loss@r{b}"] == pytest.approx(reference, rel=1e-4), f"rank {b}"
    # after evaluating (bnb's CPU fast path stays off), training still updates the adapter
    before = snapshot(trainer.model)
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "no LoRA parameter changed after evaluate() + train()"


def test_evaluate_reports_trls_own_metrics_at_every_rank(tiny_model_path, tiny_texts, tmp_path):
    # trl's SFTTrainer computes mean_token_accuracy and entropy in compute_loss; each rank gets its own.
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, eval_ranks=[1, 2, 8])
    metrics = trainer.evaluate()
    batch = next(iter(trainer.get_eval_dataloader()))
    assert len(trainer.get_eval_dataloader()) == 1  # one batch: trl's mean over batches is the token mean below
    trainer.model.eval()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    for b in (1, 2, 8):
        with torch.no_grad(), use_rank(trainer.model, b):
            logits = trainer.model(**batch).logits[:, :-1].float()
        # independent reference: next-token argmax against the label, and the entropy of the predicted distribution
        accuracy = (logits.argmax(-1) == labels)[mask].float().mean().item()
        log_p = logits.log_softmax(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)[mask].mean().item()
        assert metrics[f"eval_mean_token_accuracy@r{b}"] == pytest.approx(accuracy, abs=1e-6), f"rank {b}"
        assert metrics[f"eval_entropy@r{b}"] == pytest.approx(entropy, rel=1e-4), f"rank {b}"
    assert len({metrics[f"eval_entropy@r{b}"] for b in (1, 2, 8)}) == 3  # each rank's own, not one copied
    # the unsuffixed keys are the max rank's, as eval_loss is; trl's count of trained tokens is not per rank
    assert metrics["eval_mean_token_accuracy"] == metrics["eval_mean_token_accuracy@r8"]
    assert metrics["eval_entropy"] == metrics["eval_entropy@r8"]
    assert not any(key.startswith("eval_num_tokens@") for key in metrics)
    logged = trainer.state.log_history[-1]
    assert logged["eval_mean_token_accuracy@r1"] == metrics["eval_mean_token_accuracy@r1"]


def test_evaluate_defaults_to_powers_of_two(tiny_model_path, tiny_texts, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, min_rank=1)
    metrics = trainer.evaluate()
    assert sorted(k for k in metrics if k.startswith("eval_loss@r")) == sorted(f"eval_loss@r{b}" for b in (1, 2, 4, 8))


def _free_port():  # for the two-process tests below
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_draw_the_same_ranks_and_end_with_the_same_weights(tiny_model_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), os.path.join(SCRIPTS_DIR, "dynamic_rank_ddp.py"), tiny_model_path,
               str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [torch.load(tmp_path / f"process-{i}.pt", weights_only=True) for i in (0, 1)]
    assert states[0]["world_size"] == states[1]["world_size"] == 2
    assert states[0]["rank_history"] == states[1]["rank_history"]
    assert len(states[0]["rank_history"]) == 6
    assert len({rank for _, rank in states[0]["rank_history"]}) > 1
    for name, weight in states[0]["weights"].items():
        torch.testing.assert_close(states[1]["weights"][name], weight, rtol=0, atol=0, msg=name)


# Real model


def alpaca_texts(count, offset=0):
    from hf_quailora.embedded.data import load_dataset_any

    data = load_dataset_any("alpaca").select(range(offset, offset + count))
    return [
        f"### Instruction:\n{row['instruction']}\n{row['input']}\n### Response:\n{row['output']}".replace("\n\n", "\n")
        for row in data
    ]


@pytest.mark.slow
@require_bitsandbytes
def test_short_nf4_run_on_smollm2_lowers_eval_loss_at_every_rank(smollm2_path, tmp_path):
    model, tokenizer = load_quantized_model(smollm2_path, quantization="nf4")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    trainer = DynamicRankTrainer(
        model,
        args=DynamicRankConfig(
            output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
            learning_rate=2e-3, max_length=128, logging_steps=4, save_strategy="no", report_to="none", use_cpu=True,
            gradient_checkpointing=False, eval_ranks=[1, 2, 4, 8], update_rule="nested", seed=0,
        ),
        train_dataset=Dataset.from_dict({"text": alpaca_texts(32)}),
        eval_dataset=Dataset.from_dict({"text": alpaca_texts(4, offset=900)}),
        processing_class=tokenizer,
    )
    before = trainer.evaluate()  # B = 0: the same loss at every rank, the NF4 model's
    trainer.train()
    after = trainer.evaluate()
    for b in (1, 2, 4, 8):
        assert after[f"eval_loss@r{b}"] < before[f"eval_loss@r{b}"], f"rank {b}: {before} -> {after}"


@require_bitsandbytes
def test_quailora_init_callback_runs_inside_the_dynamic_rank_trainer(tiny_model_path, tiny_texts, tmp_path):
    """Integration only: the per-rank optimality of the start is tested exactly in test_dynamic_rank.py (the tiny
    random model's loss is not a meaningful quality signal)."""
    from hf_quailora import QuAILoRAInitCallback

    model, tokenizer = load_quantized_model(tiny_model_path, quantization="nf4")
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=16, target_modules="all-linear"))
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts, calibration_samples=len(tiny_texts),
                                    calibration_length=32)
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, model=(model, tokenizer), callbacks=[callback],
                           rank_scaling="constant", max_steps=1, learning_rate=0.0, eval_ranks=[1, 2, 4, 8])
    before = trainer.evaluate()  # B = 0: the NF4 model at every rank
    trainer.train()  # QuAILoRA at train begin; learning rate 0 keeps its factors
    assert callback.report is not None
    after = trainer.evaluate()
    for b in (1, 2, 4, 8):
        assert after[f"eval_loss@r{b}"] != before[f"eval_loss@r{b}"], f"rank {b}: QuAILoRA changed nothing"


@require_bitsandbytes
def test_rank_scaling_defaults_to_constant_with_quailora_and_to_per_rank_without(tiny_model_path, tiny_texts, tmp_path):
    from hf_quailora import QuAILoRAInitCallback

    plain = make_trainer(tiny_model_path, tiny_texts, tmp_path / "plain", max_steps=1)
    assert plain.args.rank_scaling is None and plain.rank_scaling == "per_rank"
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts, calibration_samples=4, calibration_length=32)
    with_quailora = make_trainer(tiny_model_path, tiny_texts, tmp_path / "q", quantization="nf4", callbacks=[callback],
                                 max_steps=1)
    assert with_quailora.rank_scaling == "constant"
    with_quailora.train()
    with_quailora.save_model(str(tmp_path / "adapter"))
    from hf_quailora import DynamicRankMetadata

    saved = DynamicRankMetadata.load(tmp_path / "adapter")
    assert (saved.rank_scaling, saved.quantization, saved.quailora) == ("constant", "nf4", True)
    explicit = make_trainer(tiny_model_path, tiny_texts, tmp_path / "e", callbacks=[callback], rank_scaling="rslora")
    assert explicit.rank_scaling == "rslora"
