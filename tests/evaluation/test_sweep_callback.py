"""RankSweepCallback: the lm-eval sweep over ranks at the end of training, beside the trainer's per-rank metrics."""

import json

import pytest

from hf_quailora import RankSweepCallback

from testing_utils import make_trainer


def test_rank_sweep_callback_logs_every_rank_at_train_end(tiny_model_path, tiny_texts, tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, max_steps=2, eval_ranks=[1, 8])
    callback = RankSweepCallback(trainer, ranks=[2, 8], tasks="quailora_wiki_ppl", limit=1, max_length=4096,
                                 batch_size=2)
    trainer.add_callback(callback)
    trainer.train()
    metrics = trainer.evaluate()
    for b in (1, 8):
        assert 0.0 <= metrics[f"eval_mean_token_accuracy@r{b}"] <= 1.0
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
