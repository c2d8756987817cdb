"""bench/compare_init: per-arm learning rates (`--quailora_lr_scale`), calibration on the training examples
(`--calibration_data alpaca_train`) and the cloze accuracy (`--cloze_examples`), on the tiny Llama."""

import json
import os

import pytest

from .test_compare_init import run_recipe, write_small_data
from testing_utils import require_bitsandbytes


@require_bitsandbytes
def test_lr_scales_run_as_their_own_arms_with_cloze_accuracy(tiny_model_path, tiny_texts, tmp_path, monkeypatch):
    from bench.compare_init.__main__ import make_parser
    from bench.compare_init.arms import check_arguments
    from bench.compare_init.store import arm_path

    alpaca, text = write_small_data(tmp_path, tiny_texts)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_path, "--arms", "qlora,quailora,int8", "--quailora_lr_scale", "1,0.5",
            "--rank", "4", "--steps", "1", "--eval_steps", "1", "--batch_size", "2", "--max_length", "256", "--train_data", alpaca,
            "--holdout_examples", "4", "--eval_examples", "2", "--perplexity_data", text, "--calibration_data",
            "alpaca_train", "--eval_windows", "2", "--window_length", "32", "--calibration_windows", "2",
            "--learning_rate", "1e-2", "--cloze_examples", "2", "--output_dir", str(out)]
    run_recipe(monkeypatch, argv)
    runs = out / "runs" / os.path.basename(tiny_model_path) / "r4" / "seed42"
    results = {path.stem: json.loads(path.read_text())["result"] for path in runs.glob("*.json")}
    assert sorted(results) == ["int8", "qlora", "quailora", "quailora@lr0.5"]
    assert {arm: result["learning_rate"] for arm, result in results.items()} == {
        "qlora": 1e-2, "int8": 1e-2, "quailora": 1e-2, "quailora@lr0.5": 5e-3}
    scaled, base = results["quailora@lr0.5"], results["quailora"]
    # the same start (shared, the learning rate does not enter it), a different end
    assert scaled["history"][0]["start_reused"] and scaled["perplexity_start"] == base["perplexity_start"]
    assert scaled["perplexity_end"] != base["perplexity_end"]
    for result in results.values():  # 2 documents: accuracy 0, 0.5 or 1
        assert result["cloze_start"] in (0.0, 0.5, 1.0) and result["cloze_end"] in (0.0, 0.5, 1.0)
    saved = json.loads((out / "results.json").read_text())
    rows = {(row["arm"], row["metric"]) for row in saved["decomposition"]}
    assert {("quailora", "perplexity"), ("quailora@lr0.5", "perplexity")} <= rows  # d_Q per scale
    table = (out / "results.md").read_text()
    assert "QuAILoRA (NF4, closed form), lr × 0.5 |" in table and "| accuracy gap closed end |" in table
    assert "| quailora@lr0.5 | held-out perplexity |" in table

    # resumable: every arm of the plan is found where `run_model` looks for it (it skips what exists)
    (args,) = make_parser().parse_args_into_dataclasses(argv)
    plan = check_arguments(args)
    assert plan.arms == ["qlora", "quailora", "quailora@lr0.5", "int8"]
    assert all(os.path.isfile(arm_path(str(out), tiny_model_path, 4, 42, arm)) for arm in plan.arms)


def test_alpaca_train_calibration_never_holds_the_held_out_examples(tiny_texts, tmp_path):
    from bench.compare_init.arms import CompareScriptArguments
    from bench.compare_init.run import calibration_texts, load_alpaca_split

    alpaca, _ = write_small_data(tmp_path, tiny_texts)  # instructions "Repeat sentence 0." … "Repeat sentence 11."
    args = CompareScriptArguments(train_data=alpaca, holdout_examples=4, eval_examples=2,
                                  calibration_data="alpaca_train")
    train, held_out, _ = load_alpaca_split(args)
    texts = calibration_texts(args, train)
    joined = "\n".join(texts)
    assert len(texts) == 8 and all(f"Repeat sentence {i}." in joined for i in range(8))
    assert not any(f"Repeat sentence {i}." in joined for i in range(8, 12))  # the whole held-out tail, not only
    assert all(example["prompt"] not in joined for example in held_out)  # the evaluated examples
    assert texts[0].endswith(train[0]["completion"])  # prompt and response
    limited = calibration_texts(CompareScriptArguments(**{**vars(args), "train_examples": 3}),
                                load_alpaca_split(CompareScriptArguments(**{**vars(args), "train_examples": 3}))[0])
    assert len(limited) == 3


def test_cloze_gap_closed_in_the_summary():
    from bench.compare_init.summary import summarize, summary_markdown

    accuracy = {1: {"qlora": 0.60, "quailora": 0.70, "int8": 0.80}, 2: {"qlora": 0.50, "quailora": 0.65, "int8": 0.70}}
    records = [{"model": "m", "rank": 8, "seed": seed, "arm": arm,
                "result": {"perplexity_start": 30.0, "perplexity_end": 29.0, "eval_loss_start": 1.7,
                           "eval_loss_end": 1.6, "cloze_start": acc - 0.1, "cloze_end": acc, "seconds": 1.0,
                           "history": []}}
               for seed, arms in accuracy.items() for arm, acc in arms.items()]
    (entry,) = summarize(records)
    gap = entry["arms"]["quailora"]["cloze_gap_end"]
    assert gap["mean"] == pytest.approx((0.5 + 0.75) / 2) and gap["n"] == 2
    meta = dict(steps=5, batch_size=2, learning_rate=1e-4, lr_scheduler_type="constant", max_length=64,
                target_modules="all-linear", adapter_dtype="float32", eval_windows=2, window_length=32,
                perplexity_data="wiki", eval_examples=2, holdout_examples=4)
    table = summary_markdown([entry], records, meta)
    assert "| m | 8 | QuAILoRA (NF4, closed form) | 2 | 57.5% ± 3.5% | 67.5% ± 3.5% | 62.5% ± 17.7% |" in table
    for record in records:  # arms run without --cloze_examples: no accuracy table
        del record["result"]["cloze_start"], record["result"]["cloze_end"]
    assert "accuracy gap closed" not in summary_markdown(summarize(records), records, meta)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arms", "qlora,quailora", "--quailora_lr_scale", "1,0"], "positive"),
        (["--arms", "qlora,quailora", "--quailora_lr_scale", "-0.5"], "positive"),
        (["--arms", "qlora,quailora", "--quailora_lr_scale", "nan"], "positive"),
        (["--arms", "qlora,quailora", "--quailora_lr_scale", "half"], "numbers"),
        (["--arms", "qlora,quailora", "--quailora_lr_scale", ","], "empty"),
        (["--arms", "qlora,quailora", "--quailora_lr_scale", "0.5,0.50"], "repeats"),
        (["--arms", "qlora,int8", "--quailora_lr_scale", "0.5"], "add it to `--arms`"),
        (["--cloze_examples", "0"], "--cloze_examples"),
    ],
)
def test_bad_lr_scales_and_cloze_are_refused_before_loading(monkeypatch, tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        run_recipe(monkeypatch, ["--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path),
                                 *argv])


def test_calibration_on_the_held_out_text_starts_after_the_held_out_windows(tiny_model_path, tiny_texts, tmp_path):
    from transformers import AutoTokenizer

    from bench.compare_init.arms import CompareScriptArguments
    from bench.compare_init.run import token_windows
    from hf_quailora import make_token_windows

    _, text = write_small_data(tmp_path, tiny_texts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    args = CompareScriptArguments(perplexity_data=text, calibration_data=text, eval_windows=2, window_length=16,
                                  calibration_windows=3)
    windows, calibration = token_windows(args, tokenizer, None, False, calibrate=True)
    every = make_token_windows(tokenizer, tiny_texts, 16, 5)
    assert windows.equal(every[:2]) and calibration.equal(every[2:])  # the held-out windows never calibrate
    assert token_windows(args, tokenizer, None, False, calibrate=False)[0].equal(windows)  # and are unchanged
    with pytest.raises(ValueError, match="none is left to calibrate"):
        token_windows(CompareScriptArguments(**{**vars(args), "eval_windows": 10**4}), tokenizer, None, False, True)
