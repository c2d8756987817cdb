"""`hf-quailora lm-eval`: lm-eval's own command line with `hf-dynrank` and the offline tasks, and the entry point."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval import simple_evaluate

from hf_quailora import export_rank
from hf_quailora.cli import main as cli_main
from hf_quailora.evaluation.lm_eval_bridge import DynamicRankLM, resolve_tasks
from hf_quailora.evaluation.tasks import write_offline_tasks

from testing_utils import REPO_ROOT, save_random_dynamic_rank_adapter


TASK = "quailora_wiki_ppl"
MISSING_BASE = "/nonexistent/base-model"  # a base that cannot load: an error about anything else came first


@pytest.fixture(scope="module")
def rank8_adapter(tiny_model_path, tmp_path_factory):
    """A rank-8 LoRA with random A and B saved as a dynamic-rank adapter (so every rank differs), and the model."""
    folder = tmp_path_factory.mktemp("adapter")
    model = save_random_dynamic_rank_adapter(tiny_model_path, folder)
    return model, str(folder)


def read_lm_eval_results(output_path):
    """The aggregated results lm-eval's EvaluationTracker writes under `--output_path` (one run)."""
    found = [os.path.join(root, name) for root, _, names in os.walk(output_path) for name in names
             if name.startswith("results") and name.endswith(".json")]
    assert len(found) == 1, found
    with open(found[0]) as handle:
        return json.load(handle)


def test_lm_eval_command_line_runs_hf_dynrank_in_a_fresh_process(tiny_model_path, rank8_adapter, tmp_path):
    # A fresh interpreter: nothing imported the bridge before lm-eval's parser runs, as with a shell command. The
    # user's own --include_path (one folder, all lm-eval's parser takes) is indexed beside the offline tasks: it holds
    # a copy of the offline wiki task under another name.
    model, folder = rank8_adapter
    user_tasks = tmp_path / "my_tasks"
    user_tasks.mkdir()
    offline_yaml = (Path(write_offline_tasks()) / f"{TASK}.yaml").read_text()
    (user_tasks / "my_wiki.yaml").write_text(offline_yaml.replace(f"task: {TASK}", "task: my_wiki"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "hf_quailora.cli", "lm-eval", "--model", "hf-dynrank",
               "--model_args", f"pretrained={tiny_model_path},peft={folder},rank=3,max_length=4096",
               "--tasks", f"{TASK},my_wiki", "--include_path", str(user_tasks), "--limit", "2", "--device", "cpu",
               "--output_path", str(tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "bits_per_byte" in result.stdout  # lm-eval's own results table
    results = read_lm_eval_results(tmp_path / "out")["results"]
    ours = results[TASK]["bits_per_byte,none"]
    assert results["my_wiki"]["bits_per_byte,none"] == ours

    # The stock route: rank 3 exported as a plain peft adapter, lm-eval's own `hf` model with `peft=`.
    exported = export_rank(model, 3, str(tmp_path / "r3"))
    _, manager = resolve_tasks([TASK])
    stock = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_path},peft={exported},max_length=4096,"
                            "dtype=float32", tasks=[TASK], limit=2, device="cpu", task_manager=manager,
                            log_samples=False)["results"][TASK]["bits_per_byte,none"]
    assert math.isclose(ours, stock, rel_tol=1e-5), (ours, stock)


def test_lm_eval_command_refuses_an_unknown_model_listing_the_known_names(tmp_path):
    # Nothing can load here (no base, no adapter, no such task): the model name is refused before any of them is
    # looked at, where lm-eval itself would first index its tasks and then fail on the task name.
    with pytest.raises(ValueError, match=r"`--model` 'hf-dynrnak' is not a model lm-eval knows\. Known names: .*"
                       r"\bhf-dynrank\b") as error:
        cli_main(["lm-eval", "--model", "hf-dynrnak", "--model_args",
                  f"pretrained={MISSING_BASE},peft={tmp_path / 'no-adapter'}", "--tasks", "no_such_task"])
    assert ", hf," in str(error.value)


def test_lm_eval_command_refuses_an_unknown_model_named_in_a_config_file(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("model: hf-dynrnak\ntasks: [quailora_wiki_ppl]\n")
    with pytest.raises(ValueError, match=r"`--model` 'hf-dynrnak' is not a model lm-eval knows"):
        cli_main(["lm-eval", "run", "--config", str(config)])


def test_lm_eval_command_refuses_an_include_path_that_is_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"`--include_path` '.*nope' is not a folder"):
        cli_main(["lm-eval", "--model", "hf-dynrank", "--tasks", TASK, "--include_path", str(tmp_path / "nope")])


def test_hf_dynrank_is_declared_in_the_lm_eval_models_entry_point_group():
    # Shown by importlib.metadata once the package is (re)installed from pyproject.toml (`make setup`).
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="lm_eval.models")}
    assert "hf-dynrank" in entry_points, sorted(entry_points)
    assert entry_points["hf-dynrank"].load() is DynamicRankLM


def test_hf_dynrank_refuses_a_quailora_adapter_on_another_base_unless_allowed(tiny_model_path, tmp_path):
    from hf_quailora.dynamic_rank.spec import DynamicRankMetadata

    folder = str(tmp_path / "adapter")
    save_random_dynamic_rank_adapter(tiny_model_path, folder)
    DynamicRankMetadata(max_rank=8, rank_scaling="constant", quantization="nf4", quailora=True).save(folder)
    with pytest.raises(ValueError, match="QuAILoRA adapter trained on a 'nf4' base.*allow_other_base=true"):
        DynamicRankLM.create_from_arg_string(f"pretrained={MISSING_BASE},peft={folder},quantization=none")
    with pytest.raises(ValueError, match="`allow_other_base` must be true or false"):
        DynamicRankLM.create_from_arg_string(f"pretrained={MISSING_BASE},peft={folder},allow_other_base=maybe")
    lm = DynamicRankLM.create_from_arg_string(
        f"pretrained={tiny_model_path},peft={folder},quantization=none,allow_other_base=true,rank=2")
    assert lm.dynamic_rank == 2
