"""Trainer-side per-rank metrics through `evaluate` (local metric modules), and RankSweepCallback."""

import json

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_quailora import RankSweepCallback
from hf_quailora.evaluation.metrics import load_metric, make_compute_metrics, preprocess_logits_for_metrics

from testing_utils import make_trainer


def test_token_accuracy_metric_loads_offline_and_counts_only_labelled_tokens():
    metric = load_metric("token_accuracy")
    result = metric.compute(predictions=[5, 6, 7, 8], references=[5, 0, 7, -100])
    assert result == {"token_accuracy": 2 / 3, "num_tokens": 3}
    compute = make_compute_metrics()
    # prediction at t is compared with the label at t + 1
    predictions = np.array([[1, 2, 3, 9]])
    labels = np.array([[-100, 1, 2, 4]])
    assert compute(EvalPrediction(predictions=predictions, label_ids=labels))["token_accuracy"] == 2 / 3
    with pytest.raises(ValueError, match="Unknown local metric"):
        load_metric("bleu")


def test_rank_sweep_callback_logs_every_rank_at_train_end(tiny_model_path, tiny_texts, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=2, eval_ranks=[1, 8])
    trainer.compute_metrics = make_compute_metrics()
    trainer.preprocess_logits_for_metrics = preprocess_logits_for_metrics
    callback = RankSweepCallback(trainer, ranks=[2, 8], tasks="quailora_wiki_ppl", limit=1, max_length=4096,
                                 batch_size=2)
    trainer.add_callback(callback)
    trainer.train()
    metrics = trainer.evaluate()
    for b in (1, 8):
        assert 0.0 <= metrics[f"eval_token_accuracy@r{b}"] <= 1.0
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items() if k.startswith("rank_sweep/")}
    assert {"rank_sweep/quailora_wiki_ppl/bits_per_byte@r2", "rank_sweep/quailora_wiki_ppl/bits_per_byte@r8"} <= set(logged)
    assert logged["rank_sweep/quailora_wiki_ppl/bits_per_byte@r2"] != logged["rank_sweep/quailora_wiki_ppl/bits_per_byte@r8"]
    rows = json.loads((tmp_path / "rank_sweep" / "results.json").read_text())
    assert {row["rank"] for row in rows} == {2, 8}


def test_rank_sweep_callback_bad_input(tiny_model_path, tiny_texts, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="Unknown lm-eval task"):
        RankSweepCallback(trainer, ranks=[1], tasks="nope")
    with pytest.raises(ValueError, match="every_n_evals"):
        RankSweepCallback(trainer, ranks=[1], every_n_evals=0)


def test_rank_sweep_callback_refuses_untrained_ranks_when_made_not_after_training(tiny_model_path, tiny_texts,
                                                                                  tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=1, max_rank=4)
    with pytest.raises(ValueError, match="`ranks` holds rank 8, above this adapter's max_rank 4"):
        RankSweepCallback(trainer, ranks=[1, 8])
    with pytest.raises(ValueError, match="`limit` must be a positive number"):
        RankSweepCallback(trainer, ranks=[1, 4], limit=0)
