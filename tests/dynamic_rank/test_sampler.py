"""RankSampler and the step rule: `step_plan`'s sub-models, `RankSampler.from_config`, trl's token count under SoFT."""

import dataclasses

import pytest
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from hf_quailora import DynamicRankConfig, RankSampler
from hf_quailora.dynamic_rank.sampler import SubModel, step_plan

from testing_utils import make_model, make_trainer, one_thread  # noqa: F401 (autouse fixture)


def config(tmp_path, **kwargs):
    return DynamicRankConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


# RankSampler


def test_rank_sampler_is_seeded_and_resumable():
    first = RankSampler(1, 8, seed=3)
    second = RankSampler(1, 8, seed=3)
    assert [first.sample() for _ in range(20)] == [second.sample() for _ in range(20)]
    state = first.state_dict()
    continued = [first.sample() for _ in range(10)]
    restored = RankSampler(1, 8, seed=999)
    restored.load_state_dict(state)
    assert [restored.sample() for _ in range(10)] == continued
    ranks = [RankSampler(2, 5, seed=s).sample() for s in range(200)]
    assert set(ranks) == {2, 3, 4, 5}


def test_rank_sampler_weighted_draws_only_its_choices_in_proportion():
    sampler = RankSampler(1, 16, distribution="weighted", choices=[1, 4, 16], weights=[1, 0.5, 2.5], seed=0)
    draws = [sampler.sample() for _ in range(4000)]
    assert set(draws) == {1, 4, 16}
    for choice, weight in zip([1, 4, 16], [1, 0.5, 2.5]):
        assert abs(draws.count(choice) / len(draws) - weight / 4) < 0.03


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"min_rank": 0, "max_rank": 4}, ValueError, r"`min_rank` \(0\) must be at least 1"),
        ({"min_rank": 5, "max_rank": 4}, ValueError, r"`min_rank` \(5\) exceeds `max_rank` \(4\)"),
        ({"min_rank": 1, "max_rank": 4, "distribution": "zipf"}, ValueError, "rank_distribution"),
        ({"min_rank": 1, "max_rank": 4, "distribution": "weighted"}, ValueError, "non-empty"),
        ({"min_rank": 1, "max_rank": 4, "distribution": "weighted", "choices": [1, 9]}, ValueError, "outside"),
        ({"min_rank": 1, "max_rank": 4, "distribution": "weighted", "choices": [1, 2], "weights": [1]}, ValueError,
         "one weight per rank"),
        ({"min_rank": 1, "max_rank": 4, "distribution": "weighted", "choices": [1, 2], "weights": [1, -1]}, ValueError,
         "positive"),
        ({"min_rank": 1, "max_rank": 4, "choices": [1, 2]}, ValueError, "only used with"),
        ({"min_rank": 1.5, "max_rank": 4}, TypeError, "integer"),
    ],
)
def test_rank_sampler_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        RankSampler(**kwargs)


def test_rank_sampler_refuses_a_state_with_another_range():
    state = RankSampler(1, 8).state_dict()
    with pytest.raises(ValueError, match="rank sampler was written with"):
        RankSampler(1, 16).load_state_dict(state)


# step_plan


def test_dylora_plans_one_drawn_rank_with_weight_one(tmp_path):
    draws = iter([3, 7])
    args = config(tmp_path, max_rank=8)
    assert step_plan(args, lambda: next(draws)) == [SubModel(rank=3, weight=1.0)]
    assert step_plan(args, lambda: next(draws)) == [SubModel(rank=7)]


def test_soft_plans_its_fixed_ranks_and_weights_without_drawing(tmp_path):
    def no_draw():
        raise AssertionError("SoFT must not draw a rank")

    weighted = config(tmp_path, soft_ranks=[1, 4, 8], soft_weights=[1.0, 0.5, 2.0])
    assert step_plan(weighted, no_draw) == [SubModel(1, 1.0), SubModel(4, 0.5), SubModel(8, 2.0)]
    assert step_plan(config(tmp_path, soft_ranks=[2, 4]), no_draw) == [SubModel(2), SubModel(4)]


def test_a_sub_model_is_a_frozen_value():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SubModel(rank=2).rank = 3
    assert [field.name for field in dataclasses.fields(SubModel)][:2] == ["rank", "weight"]


# RankSampler.from_config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_rank": 2, "rank_seed": 5},
        {"rank_distribution": "weighted", "rank_choices": [1, 4, 8], "rank_weights": [1, 2, 3]},
        {"rank_distribution": "weighted", "rank_choices": [2, 8], "seed": 11},
    ],
)
def test_from_config_equals_the_checked_constructor(tmp_path, kwargs):
    args = config(tmp_path, **kwargs)
    trusted = RankSampler.from_config(args, max_rank=8)
    checked = RankSampler(args.min_rank, 8, distribution=args.rank_distribution, choices=args.rank_choices,
                          weights=args.rank_weights, seed=args.rank_seed if args.rank_seed is not None else args.seed)
    assert trusted.describe() == checked.describe() and trusted.seed == checked.seed
    assert [trusted.sample() for _ in range(20)] == [checked.sample() for _ in range(20)]
    checked.load_state_dict(trusted.state_dict())  # a checkpoint of one resumes the other


def test_the_config_and_the_sampler_share_their_checks(tmp_path):
    with pytest.raises(ValueError, match="`rank_choices` holds rank 9") as from_config:
        config(tmp_path, max_rank=4, rank_distribution="weighted", rank_choices=[1, 9])
    with pytest.raises(ValueError, match="`rank_choices` holds rank 9") as from_sampler:
        RankSampler(1, 4, distribution="weighted", choices=[1, 9])
    assert str(from_config.value) == str(from_sampler.value)


# Tokens: counted once per batch, however many sub-models a step trains


def logged_tokens(trainer):
    return [entry["num_tokens"] for entry in trainer.state.log_history if "loss" in entry]


def test_a_soft_run_logs_the_tokens_of_a_plain_run(tiny_model_path, tiny_texts, tmp_path):
    settings = dict(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, max_length=32,
                    seed=0, dataloader_num_workers=0, per_device_eval_batch_size=32)
    model, tokenizer = make_model(tiny_model_path)
    data = Dataset.from_dict({"text": tiny_texts})
    plain = SFTTrainer(model, args=SFTConfig(output_dir=str(tmp_path / "plain"), **settings), train_dataset=data,
                       eval_dataset=data, processing_class=tokenizer)
    plain.train()
    expected = logged_tokens(plain)
    assert len(expected) == 3 and expected[0] > 0 and expected == sorted(expected)
    expected_eval = plain.evaluate()["eval_num_tokens"]

    for name, overrides in {"soft": {"soft_ranks": [1, 4, 8], "soft_weights": [1.0, 0.5, 2.0]}, "dylora": {}}.items():
        trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path / name, **{**settings, **overrides})
        trainer.train()
        assert logged_tokens(trainer) == expected, name
        assert trainer.evaluate()["eval_num_tokens"] == expected_eval, name
