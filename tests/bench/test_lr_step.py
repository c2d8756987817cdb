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
    printed = capsys.readouterr().out
    assert f"| {result['measured'][0]:.3f} |" in printed and (tmp_path / "lr_step.md").is_file()


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--rank", "-1"), ("--calibration_windows", "0"),
                                         ("--learning_rate", "0")])
def test_bench_lr_step_refuses_bad_settings_before_loading(flag, value, tmp_path, capsys):
    from bench.bench_lr_step import main

    with pytest.raises(SystemExit):
        main(["--model", "no-such-model", flag, value, "--results_dir", str(tmp_path)])
    assert f"{flag} must be" in capsys.readouterr().err and not list(tmp_path.iterdir())
