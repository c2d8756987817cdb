"""bench/compare_init end to end (`python -m bench.compare_init` through runpy, patched sys.argv) on the tiny Llama,
and its input checks."""

import json
import math
import runpy
import sys

import pytest

from testing_utils import REPO_ROOT, require_bitsandbytes


ALL_ARMS = ["qlora", "svd", "quailora", "int8", "fp32", "dynamic"]


def write_small_data(folder, texts):
    alpaca = folder / "alpaca.json"
    rows = [{"instruction": f"Repeat sentence {i}.", "input": "", "output": texts[i % len(texts)]} for i in range(12)]
    alpaca.write_text(json.dumps(rows))
    text = folder / "text.txt"
    text.write_text("\n".join(texts))
    return str(alpaca), str(text)


def run_recipe(monkeypatch, argv):
    """`python -m bench.compare_init *argv` from the repository root, in this process."""
    monkeypatch.syspath_prepend(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["compare_init", *argv])
    runpy.run_module("bench.compare_init", run_name="__main__")


@require_bitsandbytes
def test_compare_init_runs_every_arm_and_writes_its_report(tiny_model_path, tiny_texts, tmp_path, monkeypatch, capsys):
    alpaca, text = write_small_data(tmp_path, tiny_texts)
    out = tmp_path / "out"
    run_recipe(monkeypatch, [
        "--model_name_or_path", tiny_model_path, "--arms", ",".join(ALL_ARMS), "--steps", "2", "--eval_steps", "1",
        "--rank", "4", "--dynamic_eval_ranks", "1,2,4", "--batch_size", "2", "--max_length", "256",
        "--train_data", alpaca, "--holdout_examples", "4", "--eval_examples", "3",
        "--perplexity_data", text, "--calibration_data", text,
        "--eval_windows", "2", "--window_length", "32", "--calibration_windows", "2", "--threads", "1",
        "--learning_rate", "1e-2", "--output_dir", str(out),
    ])
    printed = capsys.readouterr().out
    for name in ("results.md", "results.json", "convergence.png"):
        assert (out / name).is_file(), name
        assert name in printed
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "convergence.png") as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100

    saved = json.loads((out / "results.json").read_text())
    arms = {result["arm"]: result for result in saved["arms"]}
    assert list(arms) == ALL_ARMS
    for arm, result in arms.items():
        for key in ("perplexity_start", "perplexity_end", "eval_loss_start", "eval_loss_end", "train_seconds"):
            assert math.isfinite(result[key]), (arm, key, result[key])
        assert [entry["step"] for entry in result["history"]] == [0, 1, 2], arm
    # Independent references computed in this run: B = 0 arms on the same NF4 base start from the same model,
    # and QuAILoRA's calibrated start is closer to fp32 than the B = 0 start.
    assert arms["qlora"]["perplexity_start"] == pytest.approx(arms["qlora"]["history"][0]["perplexity"])
    assert arms["dynamic"]["per_rank"]["start"]["4"]["perplexity"] == pytest.approx(
        arms["quailora"]["perplexity_start"], rel=1e-4)
    gap_to_fp32 = {arm: abs(arms[arm]["perplexity_start"] - arms["fp32"]["perplexity_start"]) for arm in arms}
    assert gap_to_fp32["quailora"] < gap_to_fp32["qlora"], gap_to_fp32
    assert set(arms["dynamic"]["per_rank"]["end"]) == {"1", "2", "4"}

    table = (out / "results.md").read_text()
    for label in ("QLoRA (NF4, B = 0)", "SVD start", "QuAILoRA (NF4", "LLM.int8", "fp32 base", "dynamic rank"):
        assert label in table, label
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ppl start" not in line]
    assert len(rows) == len(ALL_ARMS) + 3  # arms + per-rank rows of the dynamic arm
    assert "nan" not in table.lower() and "inf" not in table.lower()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arms", "qlora,magic"], "unknown arms"),
        (["--arms", "qlora,qlora"], "repeats"),
        (["--steps", "0"], "--steps"),
        (["--rank", "0"], "--rank"),
        (["--eval_steps", "0"], "--eval_steps"),
        (["--eval_windows", "0"], "--eval_windows"),
        (["--learning_rate", "-1"], "learning_rate"),
        (["--eval_examples", "300"], "holdout_examples"),
        (["--arms", "dynamic", "--rank", "8", "--dynamic_eval_ranks", "1,16"], "dynamic_eval_ranks"),
        (["--arms", "dynamic", "--dynamic_eval_ranks", "one"], "dynamic_eval_ranks"),
    ],
)
def test_compare_init_rejects_bad_arguments_before_loading(monkeypatch, tmp_path, argv, message):
    # A model path that does not exist: the checks must fail before anything is loaded.
    with pytest.raises(ValueError, match=message):
        run_recipe(
            monkeypatch, ["--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path), *argv]
        )
    assert not (tmp_path / "results.md").exists()


def test_compare_init_rejects_too_little_data(tiny_model_path, tiny_texts, monkeypatch, tmp_path):
    alpaca, _ = write_small_data(tmp_path, tiny_texts)
    with pytest.raises(ValueError, match="too few"):
        run_recipe(monkeypatch, ["--model_name_or_path", tiny_model_path, "--train_data", alpaca, "--holdout_examples",
                                 "12", "--eval_examples", "4", "--output_dir", str(tmp_path / "out")])


def test_compare_init_rejects_unknown_choice(monkeypatch, tmp_path):
    with pytest.raises(SystemExit):  # argparse `choices`
        run_recipe(monkeypatch, ["--dynamic_update_rule", "sometimes", "--output_dir", str(tmp_path)])
