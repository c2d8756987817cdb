"""SoFT by depth in the lm-eval bridge: `evaluate_ranks(exits=)`, `hf-dynrank`'s `exit=`, `hf-quailora eval --exits`
and `hf-quailora export --exit`, on the tiny 2-layer Llama."""

import json
import math

import pytest
from lm_eval import simple_evaluate
from safetensors.torch import load_file
from transformers import AutoTokenizer

from hf_quailora.cli import main as cli_main
from hf_quailora.evaluation.lm_eval_bridge import evaluate_ranks, resolve_tasks

from testing_utils import save_random_dynamic_rank_adapter


TASK = "quailora_wiki_ppl"


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    model = save_random_dynamic_rank_adapter(tiny_model_path, folder)
    return model, AutoTokenizer.from_pretrained(tiny_model_path), str(folder)


def test_evaluate_ranks_over_exits_and_the_registered_model_at_an_exit(tiny_model_path, tiny_adapter):
    model, tokenizer, folder = tiny_adapter
    rows = evaluate_ranks(model, tokenizer, [3], [TASK], limit=2, max_length=4096, exits=[1, 2], show_progress=False)
    full = evaluate_ranks(model, tokenizer, [3], [TASK], limit=2, max_length=4096, show_progress=False)
    value = {row["model"]: row["value"] for row in rows + full if row["metric"] == "bits_per_byte"}
    assert value["dynamic-rank LoRA @ exit 2"] == pytest.approx(value["dynamic-rank LoRA"], rel=1e-6)
    assert not math.isclose(value["dynamic-rank LoRA @ exit 1"], value["dynamic-rank LoRA"], rel_tol=1e-4)
    _, manager = resolve_tasks([TASK])
    ours = simple_evaluate(model="hf-dynrank", model_args=f"pretrained={tiny_model_path},peft={folder},rank=3,exit=1,"
                           "max_length=4096", task_manager=manager, tasks=[TASK], limit=2, log_samples=False,
                           bootstrap_iters=0, device="cpu")
    assert ours["results"][TASK]["bits_per_byte,none"] == pytest.approx(value["dynamic-rank LoRA @ exit 1"], rel=1e-5)
    with pytest.raises(ValueError, match="above the model's 2 layers"):
        evaluate_ranks(model, tokenizer, [3], [TASK], limit=2, exits=[3])


def test_cli_eval_exits_and_export_exit(tiny_model_path, tiny_adapter, tmp_path, capsys):
    _, _, folder = tiny_adapter
    out = tmp_path / "sweep"
    assert cli_main(["eval", "--model", tiny_model_path, "--adapter", folder, "--ranks", "2", "--exits", "1,2",
                     "--tasks", TASK, "--limit", "1", "--max_length", "4096", "--no_base_baseline",
                     "--output_dir", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {row["model"] for row in rows} == {"dynamic-rank LoRA @ exit 1", "dynamic-rank LoRA @ exit 2"}
    assert cli_main(["export", "--model", tiny_model_path, "--adapter", folder, "--rank", "2", "--exit", "1",
                     "--output_dir", str(tmp_path / "e1r2")]) == 0
    assert "num_hidden_layers=1" in capsys.readouterr().out
    keys = load_file(str(tmp_path / "e1r2" / "adapter_model.safetensors"))
    assert keys and not any(".layers.1." in key for key in keys)
    assert json.loads((tmp_path / "e1r2" / "dynamic_rank.json").read_text())["exported_exit"] == 1
    # the loader gives an exported exit its base of 1 layer: the same numbers as exit 1 of the full adapter
    assert cli_main(["eval", "--model", tiny_model_path, "--adapter", str(tmp_path / "e1r2"), "--ranks", "2",
                     "--tasks", TASK, "--limit", "1", "--max_length", "4096", "--no_base_baseline",
                     "--output_dir", str(tmp_path / "exported")]) == 0
    exported = json.loads((tmp_path / "exported" / "results.json").read_text())
    value = {(row["model"], row["metric"]): row["value"] for row in rows}
    for row in exported:
        assert row["value"] == pytest.approx(value[("dynamic-rank LoRA @ exit 1", row["metric"])], rel=1e-5)


@pytest.mark.parametrize("argv", [["eval", "--ranks", "2", "--exits", "1,3", "--tasks", TASK],
                                  ["export", "--rank", "2", "--exit", "3"],
                                  ["export", "--rank", "2", "--exit", "3", "--merged"]])
def test_cli_refuses_an_exit_above_the_depth_before_loading(tiny_model_path, tiny_adapter, tmp_path, monkeypatch,
                                                            argv):
    import hf_quailora.cli as cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the exit was checked")

    monkeypatch.setattr(cli, "_load", no_load)
    _, _, folder = tiny_adapter
    with pytest.raises(ValueError, match="exit 3, above the model's 2 layers"):
        cli_main([*argv, "--model", tiny_model_path, "--adapter", folder, "--output_dir", str(tmp_path / "out")])
