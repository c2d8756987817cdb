"""lm-eval bridge on a tiny Llama with a LoRA whose ranks differ (random B): sweeps, registered model, CLI."""

import json
import math
import os
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from transformers import AutoTokenizer

from hf_quailora import export_rank
from hf_quailora.cli import main as cli_main
from hf_quailora.dynamic_rank.spec import DynamicRankMetadata
from hf_quailora.evaluation.lm_eval_bridge import evaluate_ranks, resolve_tasks
from hf_quailora.evaluation.tasks import write_offline_tasks

from testing_utils import require_bitsandbytes, save_adapter, save_random_dynamic_rank_adapter


TASK = "quailora_wiki_ppl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_path, tmp_path_factory):
    """A rank-8 LoRA with random A and B saved as a dynamic-rank adapter (so every rank differs)."""
    folder = tmp_path_factory.mktemp("adapter")
    model = save_random_dynamic_rank_adapter(tiny_model_path, folder)
    return model, AutoTokenizer.from_pretrained(tiny_model_path), str(folder)


def values(rows, metric="bits_per_byte"):
    return {row["rank"]: row["value"] for row in rows if row["metric"] == metric}


def test_sweep_over_ranks_writes_table_json_and_plot(tiny_adapter, tmp_path):
    model, tokenizer, _ = tiny_adapter
    model.train()
    rows = evaluate_ranks(model, tokenizer, "1,8", [TASK], limit=2, max_length=4096, output_dir=str(tmp_path),
                          baselines={"base model": "no_adapter"}, show_progress=False)
    by_rank = values(rows)
    assert set(by_rank) == {None, 1, 8}
    assert all(math.isfinite(v) for v in by_rank.values())
    assert len(set(by_rank.values())) == 3  # base, rank 1 and rank 8 all differ
    assert model.training  # mode restored
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert "| model | rank |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="already holds results"):
        evaluate_ranks(model, tokenizer, [1], [TASK], limit=1, output_dir=str(tmp_path))


def test_registered_model_equals_exported_adapter_in_stock_hf(tiny_model_path, tiny_adapter, tmp_path):
    model, _, folder = tiny_adapter
    exported = export_rank(model, 3, str(tmp_path / "r3"))
    manager_kwargs = dict(tasks=[TASK], limit=2, log_samples=False, bootstrap_iters=0, device="cpu")
    _, manager = resolve_tasks([TASK])
    ours = simple_evaluate(model="hf-dynrank", model_args=f"pretrained={tiny_model_path},peft={folder},rank=3,"
                           "max_length=4096", task_manager=manager, **manager_kwargs)
    stock = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_path},peft={exported},max_length=4096,"
                            "dtype=float32", task_manager=manager, **manager_kwargs)
    full = simple_evaluate(model="hf-dynrank", model_args=f"pretrained={tiny_model_path},peft={folder},"
                           "max_length=4096", task_manager=manager, **manager_kwargs)
    a, b, c = (r["results"][TASK]["bits_per_byte,none"] for r in (ours, stock, full))
    assert math.isclose(a, b, rel_tol=1e-5), (a, b)
    assert not math.isclose(a, c, rel_tol=1e-4)  # rank 3 is not the full rank 8


def test_cli_eval_and_export_end_to_end(tiny_model_path, tiny_adapter, tmp_path, capsys):
    _, _, folder = tiny_adapter
    out = tmp_path / "sweep"
    assert cli_main(["eval", "--model", tiny_model_path, "--adapter", folder, "--ranks", "2,8", "--tasks", TASK,
                     "--limit", "1", "--max_length", "4096", "--output_dir", str(out)]) == 0
    assert "Results written" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert {row["rank"] for row in rows} == {None, 2, 8}
    assert cli_main(["export", "--model", tiny_model_path, "--adapter", folder, "--rank", "2",
                     "--output_dir", str(tmp_path / "r2")]) == 0
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert config["r"] == 2
    with pytest.raises(ValueError, match="`--rank` holds rank 9, outside this adapter's range 1..8"):
        cli_main(["export", "--model", tiny_model_path, "--adapter", folder, "--rank", "9", "--output_dir", str(tmp_path)])


def test_bad_input_is_rejected_before_running(tiny_adapter, tmp_path):
    model, tokenizer, _ = tiny_adapter
    with pytest.raises(ValueError, match="outside this adapter's range 1..8"):
        evaluate_ranks(model, tokenizer, [0, 4], [TASK])
    with pytest.raises(ValueError, match="outside this adapter's range"):
        evaluate_ranks(model, tokenizer, [9], [TASK])
    with pytest.raises(ValueError, match="integers"):
        evaluate_ranks(model, tokenizer, "one,two", [TASK])
    with pytest.raises(ValueError, match="Unknown lm-eval task"):
        evaluate_ranks(model, tokenizer, [1], ["no_such_task"])
    with pytest.raises(ValueError, match="Hugging Face Hub"):
        evaluate_ranks(model, tokenizer, [1], ["hellaswag"])  # tests run with HF_HUB_OFFLINE=1
    no_pad = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        evaluate_ranks(model, no_pad, [1], [TASK])


MISSING_BASE = "/nonexistent/base-model"  # a base that cannot load: an error about anything else came first


@pytest.fixture(scope="module")
def trained_to_4(tiny_model_path, tmp_path_factory):
    """A LoRA of r=8 trained (as its dynamic_rank.json says) only up to max_rank=4."""
    return save_adapter(tiny_model_path, tmp_path_factory.mktemp("max4") / "adapter", max_rank=4)


def test_hf_dynrank_defaults_to_the_recorded_max_rank(tiny_model_path, trained_to_4):
    from hf_quailora.evaluation.lm_eval_bridge import DynamicRankLM

    assert DynamicRankLM(pretrained=tiny_model_path, peft=trained_to_4, max_length=64).dynamic_rank == 4


def test_hf_dynrank_refuses_ranks_above_max_rank_before_loading(trained_to_4):
    from hf_quailora.evaluation.lm_eval_bridge import DynamicRankLM

    with pytest.raises(ValueError, match="`rank` holds rank 8, above this adapter's max_rank 4"):
        DynamicRankLM.create_from_arg_string(f"pretrained={MISSING_BASE},peft={trained_to_4},rank=8")


def test_hf_dynrank_refuses_a_rank_that_is_not_a_number_before_loading(trained_to_4):
    from hf_quailora.evaluation.lm_eval_bridge import DynamicRankLM

    with pytest.raises(ValueError, match="`rank` must be a whole number such as rank=4; got 'abc'"):
        DynamicRankLM.create_from_arg_string(f"pretrained={MISSING_BASE},peft={trained_to_4},rank=abc")


def cli_eval(adapter, out, *extra):
    return cli_main(["eval", "--model", MISSING_BASE, "--adapter", adapter, "--ranks", "1", "--tasks", TASK,
                     "--output_dir", str(out), *extra])


@pytest.mark.parametrize("ranks, match", [
    ("1,8", "`--ranks` holds rank 8, above this adapter's max_rank 4"),
    ("0", "`--ranks` holds rank 0, outside this adapter's range 1..4"),
    ("99", "`--ranks` holds rank 99, outside this adapter's range 1..4"),
])
def test_cli_eval_refuses_ranks_outside_the_trained_range_before_loading(trained_to_4, tmp_path, ranks, match):
    with pytest.raises(ValueError, match=match):
        cli_eval(trained_to_4, tmp_path / "out", "--ranks", ranks)


def test_cli_export_refuses_a_rank_above_max_rank_before_loading(trained_to_4, tmp_path):
    with pytest.raises(ValueError, match="`--rank` holds rank 8, above this adapter's max_rank 4"):
        cli_main(["export", "--model", MISSING_BASE, "--adapter", trained_to_4, "--rank", "8",
                  "--output_dir", str(tmp_path / "r8")])


@pytest.mark.parametrize("option, match", [
    (["--limit", "-1"], "`limit` must be a positive number"),
    (["--limit", "0"], "`limit` must be a positive number"),
    (["--batch_size", "0"], "`batch_size` must be at least 1"),
    (["--max_length", "0"], "`max_length` must be at least 2"),
    (["--num_fewshot", "-1"], "`num_fewshot` must be 0 or more"),
])
def test_cli_eval_refuses_bad_lm_eval_options_before_loading(trained_to_4, tmp_path, option, match):
    with pytest.raises(ValueError, match=match):
        cli_eval(trained_to_4, tmp_path / "out", *option)


@pytest.mark.parametrize("command", ["eval", "export"])
def test_cli_refuses_an_output_dir_that_is_a_file_before_loading(trained_to_4, tmp_path, command):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        if command == "eval":
            cli_eval(trained_to_4, tmp_path / "taken")
        else:
            cli_main(["export", "--model", MISSING_BASE, "--adapter", trained_to_4, "--rank", "2",
                      "--output_dir", str(tmp_path / "taken")])


def test_cli_export_refuses_to_write_into_the_adapter_folder(trained_to_4):
    before = sorted(os.listdir(trained_to_4))
    with pytest.raises(ValueError, match="is the folder of the adapter being exported"):
        cli_main(["export", "--model", MISSING_BASE, "--adapter", trained_to_4, "--rank", "2", "--output_dir",
                  trained_to_4, "--overwrite"])
    assert sorted(os.listdir(trained_to_4)) == before
    assert json.loads((Path(trained_to_4) / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("command", ["eval", "export"])
def test_cli_refuses_a_missing_adapter_folder_before_loading(tmp_path, command):
    args = ["--ranks", "1"] if command == "eval" else ["--rank", "1"]
    with pytest.raises(ValueError, match="Adapter folder .* does not exist"):
        cli_main([command, "--model", MISSING_BASE, "--adapter", str(tmp_path / "nope"), *args,
                  "--output_dir", str(tmp_path / "out")])


def test_an_interrupted_report_keeps_the_earlier_results_whole(tmp_path, monkeypatch):
    from hf_quailora.evaluation import reporting

    rows = [{"model": "m", "rank": 1, "task": "t", "metric": "x", "value": 1.0, "stderr": None}]
    reporting.write_rank_report(rows, str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in ("results.json", "results.md", "results.png")}

    def interrupted(rows, path, title=None):
        Path(path).write_bytes(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(reporting, "plot_rank_curves", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reporting.write_rank_report([{**rows[0], "value": 2.0}], str(tmp_path))
    assert (tmp_path / "results.png").read_bytes() == before["results.png"]
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md", "results.png"]


def test_plain_adapter_is_evaluated_at_its_own_rank_only(tiny_model_path, tiny_adapter, tmp_path):
    model, _, _ = tiny_adapter
    plain = export_rank(model, 4, str(tmp_path / "plain"))
    (tmp_path / "plain" / "dynamic_rank.json").unlink()  # now an ordinary peft adapter, nothing says "dynamic"
    _, manager = resolve_tasks([TASK])
    with pytest.warns(UserWarning, match="not a dynamic-rank adapter"):
        from hf_quailora.evaluation.lm_eval_bridge import DynamicRankLM

        lm = DynamicRankLM(pretrained=tiny_model_path, peft=plain, rank=2, max_length=4096)
    assert lm.dynamic_rank == 4


@require_bitsandbytes
def test_quantization_none_in_model_args_overrides_the_recorded_base(tiny_model_path, tiny_adapter, tmp_path):
    # lm-eval parses `none` in --model_args as Python None, which would mean "the recorded quantization" (NF4 here).
    import bitsandbytes as bnb

    from hf_quailora.evaluation.lm_eval_bridge import DynamicRankLM

    model, _, _ = tiny_adapter
    folder = tmp_path / "nf4_trained"
    model.save_pretrained(folder)
    DynamicRankMetadata(min_rank=1, max_rank=8, rank_scaling="per_rank", quantization="nf4").save(folder)

    def has_4bit(lm):
        return any(isinstance(m, bnb.nn.Linear4bit) for m in lm.model.modules())

    common = f"pretrained={tiny_model_path},peft={folder},max_length=4096"
    assert has_4bit(DynamicRankLM.create_from_arg_string(common))  # the recorded base by default
    assert not has_4bit(DynamicRankLM.create_from_arg_string(common + ",quantization=none"))
    assert not has_4bit(DynamicRankLM.create_from_arg_string(common + ",quantization=None"))


def test_offline_tasks_are_written_and_indexed(tmp_path):
    folder = write_offline_tasks(tmp_path)
    names, manager = resolve_tasks("quailora_wiki_ppl,quailora_alpaca_loss,quailora_alpaca_mc,quailora_wiki_cloze")
    assert len(names) == 4
    mc = [json.loads(line) for line in (tmp_path / "quailora_alpaca_mc.jsonl").read_text().splitlines()]
    assert len(mc) == 200 and all(len(row["choices"]) == 4 and 0 <= row["label"] < 4 for row in mc)
    cloze = [json.loads(line) for line in (tmp_path / "quailora_wiki_cloze.jsonl").read_text().splitlines()]
    assert len(cloze) == 500 and all(len(set(row["choices"])) == 4 and 0 <= row["label"] < 4 for row in cloze)
    # the blank is the word that ends the sentence, never in the context's last position; labels are balanced
    assert all(row["context"].split()[-1] != row["choices"][row["label"]] for row in cloze)
    assert {row["label"] for row in cloze} == {0, 1, 2, 3}
    assert max(sum(row["label"] == k for row in cloze) for k in range(4)) < 0.3 * len(cloze)
    assert folder == str(tmp_path)


def test_offline_tasks_are_written_once_from_the_shipped_yaml(tmp_path):
    first = write_offline_tasks(tmp_path / "tasks")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tasks").iterdir()}
    assert write_offline_tasks(tmp_path / "tasks") == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tasks").iterdir()} == stamps
    yaml_text = (tmp_path / "tasks" / "quailora_wiki_ppl.yaml").read_text()
    assert str((tmp_path / "tasks" / "quailora_wiki_ppl.jsonl").resolve()) in yaml_text


def test_plotting_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('pdf'); from hf_quailora.evaluation.reporting import plot_rank_curves; "
        f"plot_rank_curves([{{'model': 'm', 'rank': 1, 'task': 't', 'metric': 'x', 'value': 1.0}}], {str(tmp_path / 'p.png')!r}); "
        "import sys; print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["pdf", "False"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
