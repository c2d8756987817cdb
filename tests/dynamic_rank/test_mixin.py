"""`DynamicRankMixin` over a plain transformers `Trainer` (no trl): ranks drawn per step, `eval_loss@r{b}`
(hf_quailora/dynamic_rank/mixin.py)."""

from dataclasses import dataclass

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_quailora import DynamicRankMixin, DynamicRankSettings

from testing_utils import R, make_model, snapshot


class PlainDynamicRankTrainer(DynamicRankMixin, Trainer):
    pass


@dataclass
class RankTrainingArguments(TrainingArguments):
    min_rank: int = 2
    eval_ranks: list[int] | None = None


def _trainer(tiny_model_path, tiny_texts, tmp_path, args_class=TrainingArguments, **kwargs):
    from datasets import Dataset

    model, tokenizer = make_model(tiny_model_path)
    data = Dataset.from_dict({"text": tiny_texts}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=32), remove_columns=["text"]
    )
    args = args_class(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                      per_device_eval_batch_size=8, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                      report_to="none", use_cpu=True, seed=0, **kwargs.pop("args", {}))
    return PlainDynamicRankTrainer(model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer,
                                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), **kwargs)


def test_the_mixin_over_a_plain_trainer_draws_ranks_and_evaluates_every_rank(tiny_model_path, tiny_texts, tmp_path):
    trainer = _trainer(tiny_model_path, tiny_texts, tmp_path,
                       dynamic_rank=DynamicRankSettings(eval_ranks=[1, 2, R], rank_seed=5))
    before = snapshot(trainer.model)
    trainer.train()
    assert len(trainer.rank_history) == 2 and all(1 <= b <= R for _, b in trainer.rank_history)
    logged = [entry["rank"] for entry in trainer.state.log_history if "rank" in entry]
    assert logged == [float(b) for _, b in trainer.rank_history]  # logging_steps=1: each step's own rank
    assert any(not torch.equal(before[name], param) for name, param in snapshot(trainer.model).items())
    metrics = trainer.evaluate()
    losses = [metrics[f"eval_loss@r{b}"] for b in (1, 2, R)]
    assert len(set(losses)) == 3 and metrics["eval_loss"] == metrics[f"eval_loss@r{R}"]
    assert metrics["eval_perplexity@r1"] == pytest.approx(torch.tensor(losses[0]).exp().item(), rel=1e-5)
    assert trainer.rank_scaling == "per_rank"


def test_the_mixin_reads_the_settings_from_the_trainers_args(tiny_model_path, tiny_texts, tmp_path):
    trainer = _trainer(tiny_model_path, tiny_texts, tmp_path, args_class=RankTrainingArguments,
                       args={"eval_ranks": [2, 4]})
    assert (trainer.rank_settings.min_rank, trainer.eval_ranks, trainer.max_rank) == (2, [2, 4], R)
    assert trainer.rank_settings.seed == 0  # rank_seed falls back to the args' seed
    with pytest.raises(ValueError, match="`min_rank` \\(12\\) exceeds"):
        _trainer(tiny_model_path, tiny_texts, tmp_path, dynamic_rank=DynamicRankSettings(min_rank=12))
