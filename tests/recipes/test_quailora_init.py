"""The recipes run end to end (via runpy with a patched sys.argv), at a reduced size."""

import json
import os
import runpy
import sys

import pytest

from testing_utils import REPO_ROOT, TINY_LINEAR_LAYERS, require_bitsandbytes


RECIPES = os.path.join(REPO_ROOT, "recipes")


@require_bitsandbytes
def test_quailora_init_recipe_runs_and_writes_its_report(tiny_model_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["quailora_init.py", "--model_name_or_path", tiny_model_path, "--rank", "4", "--num_samples", "4",
            "--window_length", "32", "--max_length", "32", "--eval_windows", "2", "--output_dir", str(out),
            "--show_progress", "false"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(RECIPES, "quailora_init.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "Held-out perplexity" in printed and "| **all layers** |" in printed
    saved = json.loads((out / "quailora_report.json").read_text())
    assert saved["perplexity_quailora_start"] > 0 and len(saved["report"]["layers"]) == TINY_LINEAR_LAYERS
    assert (out / "quailora_report.md").read_text().startswith("| layer |")


def test_quailora_init_recipe_rejects_bad_arguments(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["quailora_init.py", "--solver", "magic", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse rejects a value outside `choices`
        runpy.run_path(os.path.join(RECIPES, "quailora_init.py"), run_name="__main__")
    monkeypatch.setattr(sys, "argv", ["quailora_init.py", "--rank", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="rank"):
        runpy.run_path(os.path.join(RECIPES, "quailora_init.py"), run_name="__main__")
