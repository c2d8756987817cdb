"""bench/bench_lr_step.py on the tiny Llama: the measured step ratio of a QuAILoRA start and the predicted one."""

import json

import pytest

from testing_utils import require_bitsandbytes


@require_bitsandbytes
def test_bench_lr_step_measures_and_predicts_the_step_ratio(tiny_model_path, tmp_path, capsys):
    from bench.bench_lr_step import main

    main(["--model", tiny_model_path, "--rank", "8", "--steps", "2", "--calibration_windows", "4",
          "--results_dir", str(tmp_path)])
    (path,) = tmp_path.glob("lr_step-*.json")
    result = json.loads(path.read_text())
    assert len(result["qlora_distance"]) == len(result["quailora_distance"]) == 2
    assert all(d > 0 for d in result["qlora_distance"] + result["quailora_distance"])
    # the first AdamW step is close to a sign step, where the prediction holds (SmolLM2: 2.223 vs 2.231)
    assert result["measured"][0] == pytest.approx(result["predicted"], rel=0.15)
    # and in what the model predicts: KL of each step from its start, the start's correction, the rule's factor
    assert len(result["qlora_kl"]) == len(result["quailora_kl"]) == 2 and result["correction_kl"] > 0
    assert result["kl_over_correction"][0] == pytest.approx(result["quailora_kl"][0] / result["correction_kl"])
    for source in ("c4", "alpaca_train"):
        rule = result["rule"][source]
        assert rule["scale"] in (1.0, 0.5, 0.25, 0.125) and rule["correction_kl"] > 0
    printed = capsys.readouterr().out
    assert f"| {result['measured'][0]:.3f} |" in printed and (tmp_path / "lr_step.md").is_file()


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--rank", "-1"), ("--calibration_windows", "0"),
                                         ("--learning_rate", "0")])
def test_bench_lr_step_refuses_bad_settings_before_loading(flag, value, tmp_path, capsys):
    from bench.bench_lr_step import main

    with pytest.raises(SystemExit):
        main(["--model", "no-such-model", flag, value, "--results_dir", str(tmp_path)])
    assert f"{flag} must be" in capsys.readouterr().err and not list(tmp_path.iterdir())


@require_bitsandbytes
def test_bench_lr_rule_repeats_the_callbacks_measurement_on_disjoint_batches(tiny_model_path, tmp_path, capsys):
    from bench.bench_lr_rule import BUDGETS, main, pick

    main(["--model", tiny_model_path, "--rank", "8", "--repeats", "2", "--results_dir", str(tmp_path)])
    (path,) = tmp_path.glob("lr_rule-*-r8.json")  # a rank other than 64 is in the name
    result = json.loads(path.read_text())
    assert [row["set"] for row in result["rows"]] == [0, 1]
    first, second = (row["ratios"] for row in result["rows"])
    assert first != second and all(value > 0 for value in first.values())  # two different sets of sequences
    assert first["1.0"] > first["0.5"] > first["0.25"]  # a smaller step moves the predictions less
    assert pick({"1.0": 0.9, "0.5": 0.3, "0.25": 0.1}, 0.5) == 0.5 and pick({"1.0": 9.0, "0.5": 5.0}, 0.5) == 0.5
    assert pick({"1.0": 0.1, "0.5": 0.03}, 0.2) == 1.0
    printed = capsys.readouterr().out
    assert all(f"factors at budget {b:g}" in printed for b in BUDGETS) and " | 8 | 2 | " in printed  # r, sets
    assert (tmp_path / "lr_rule.md").is_file()
