"""The recipes run end to end (via runpy with a patched sys.argv), at a reduced size."""

import json
import os
import runpy
import sys

import pytest

from testing_utils import REPO_ROOT, TINY_LINEAR_LAYERS, TINY_NUM_BLOCKS, require_bitsandbytes


RECIPES = os.path.join(REPO_ROOT, "recipes")


@require_bitsandbytes
def test_quailora_init_recipe_runs_and_writes_its_report(tiny_model_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["quailora_init.py", "--model_name_or_path", tiny_model_path, "--lora_r", "4", "--calibration_samples", "4",
            "--window_length", "32", "--calibration_length", "32", "--eval_windows", "2", "--output_dir", str(out),
            "--show_progress", "false"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(RECIPES, "quailora_init.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "Held-out perplexity" in printed and "| **all layers** |" in printed
    saved = json.loads((out / "quailora_report.json").read_text())
    assert saved["perplexity_quailora_start"] > 0 and len(saved["report"]["layers"]) == TINY_LINEAR_LAYERS
    assert (out / "quailora_report.md").read_text().startswith("| layer |")
    # the initialised adapter, as `hf-quailora init` writes it
    metadata = json.loads((out / "adapter" / "dynamic_rank.json").read_text())
    assert (metadata["quailora"], metadata["rank_scaling"], metadata["max_rank"]) == (True, "constant", 4)
    assert metadata["calibration"]["dataset"] == "c4" and metadata["calibration"]["samples"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@require_bitsandbytes
def test_quailora_init_recipe_takes_trl_flags(tiny_model_path, tmp_path, monkeypatch):
    """trl's names: LLM.int8 via --load_in_8bit, LoRA on two modules given space-separated, alpha defaults to r."""
    out = tmp_path / "out"
    argv = ["quailora_init.py", "--model_name_or_path", tiny_model_path, "--load_in_8bit", "--lora_r", "2",
            "--lora_target_modules", "q_proj", "v_proj", "--calibration_samples", "2", "--calibration_length", "32",
            "--eval_windows", "0", "--output_dir", str(out), "--show_progress", "false", "--solver", "als",
            "--als_iterations", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(RECIPES, "quailora_init.py"), run_name="__main__")
    saved = json.loads((out / "quailora_report.json").read_text())
    assert saved["quantization"] == "int8" and saved["rank"] == 2 and saved["solver"] == "als"
    assert len(saved["report"]["layers"]) == 2 * TINY_NUM_BLOCKS  # q_proj and v_proj of each block


@require_bitsandbytes
def test_quailora_init_recipe_still_takes_its_old_flag_names(tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["quailora_init.py", "--model_name_or_path", tiny_model_path, "--rank", "2", "--target_modules", "k_proj",
            "--num_samples=2", "--max_length", "32", "--eval_windows", "0", "--output_dir", str(out),
            "--quailora_show_progress", "false", "--quailora_solver", "svd"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.warns(FutureWarning) as record:
        runpy.run_path(os.path.join(RECIPES, "quailora_init.py"), run_name="__main__")
    renamed = {("rank", "lora_r"), ("target_modules", "lora_target_modules"), ("num_samples", "calibration_samples"),
               ("max_length", "calibration_length"), ("quailora_show_progress", "show_progress"),
               ("quailora_solver", "solver")}
    assert {f"`--{old}` is deprecated; use `--{new}`." for old, new in renamed} <= {str(w.message) for w in record}
    saved = json.loads((out / "quailora_report.json").read_text())
    assert saved["rank"] == 2 and len(saved["report"]["layers"]) == TINY_NUM_BLOCKS  # k_proj only
    assert saved["solver"] == "svd"


@pytest.mark.parametrize("argv, error, match", [
    (["--solver", "magic"], SystemExit, None),  # argparse rejects a value outside `choices`
    (["--calibration_length", "0"], ValueError, r"`calibration_length` \(0\) must be a positive integer"),
    (["--lora_r", "0"], ValueError, r"`--lora_r` \(0\) must be at least 1"),
    (["--load_in_4bit", "--load_in_8bit"], ValueError, "`--load_in_4bit` and `--load_in_8bit` were both given"),
    (["--use_dora"], ValueError, "`--use_dora` is not supported"),
    (["--use_peft", "false"], ValueError, "`--use_peft false`"),
    (["--quantization", "none"], ValueError, "QuAILoRA corrects a quantization error"),
    (["--export_ranks", "4"], ValueError, "`--export_ranks` applies to recipes that train"),
    (["--quailora", "false"], ValueError, "`--quailora` applies to recipes that train"),
    (["--calibration_dataset", "c44"], ValueError, "'c44' is neither an embedded dataset"),
])
def test_quailora_init_recipe_rejects_bad_arguments_before_loading(argv, error, match, monkeypatch, tmp_path):
    argv = ["quailora_init.py", "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path),
            *argv]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(error, match=match):  # a model that cannot load: each error comes first
        runpy.run_path(os.path.join(RECIPES, "quailora_init.py"), run_name="__main__")
