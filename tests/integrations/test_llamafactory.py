"""The LLaMA-Factory route (docs/launchers.md): `hf-quailora init` writes the QuAILoRA start here, LLaMA-Factory
trains it through `adapter_name_or_path` in its own environment, and `hf-quailora export` and
`load_dynamic_rank_adapter` read what it saved, on the tiny Llama, CPU, NF4, 3 steps; in one process and in two
(LLaMA-Factory's own torchrun launch, DDP over gloo).

LLaMA-Factory 0.9.5 pins `peft<=0.18.1` and `trl<=0.24`, so it cannot share this environment: `make test-llamafactory`
builds `.venv-llamafactory` and runs this file here, calling `llamafactory-cli` of that environment in a subprocess
(`LLAMAFACTORY_VENV` names another one). Without it the test skips.
"""

import json
import math
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from hf_quailora import DynamicRankMetadata, load_dynamic_rank_adapter
from hf_quailora._peft_utils import CONFIG_FACTS_KEY
from hf_quailora.dynamic_rank.saved_adapter import read_saved_adapter
from hf_quailora.dynamic_rank.spec import METADATA_FILE

from testing_utils import REPO_ROOT, one_thread, require_bitsandbytes  # noqa: F401 (autouse fixture)


LLAMAFACTORY_VENV = os.path.abspath(os.environ.get("LLAMAFACTORY_VENV", os.path.join(REPO_ROOT, ".venv-llamafactory")))
LLAMAFACTORY_CLI = os.path.join(LLAMAFACTORY_VENV, "bin", "llamafactory-cli")
require_llamafactory = pytest.mark.skipif(
    not os.path.isfile(LLAMAFACTORY_CLI),
    reason="needs LLaMA-Factory in an environment of its own (it pins peft<=0.18.1, trl<=0.24): "
    "`make test-llamafactory` builds .venv-llamafactory (LLaMA-Factory 0.9.5) and runs this file.",
)
STEPS = 3


def _yaml(model_path, start, data_dir, output_dir) -> str:
    settings = {
        "model_name_or_path": model_path, "adapter_name_or_path": start, "quantization_bit": 4,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "dataset": "tiny", "dataset_dir": data_dir,
        "template": "default", "cutoff_len": 64, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
        "output_dir": output_dir, "logging_steps": 1, "save_strategy": "no", "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3, "max_steps": STEPS, "bf16": False, "report_to": "none", "seed": 0,
    }
    return "\n".join(f"{key}: {json.dumps(value)}" for key, value in settings.items()) + "\n"


def _train_in_llamafactory(tmp_path, model_path, start, processes: int = 1) -> tuple[str, str]:
    """`llamafactory-cli train` on a YAML and a local dataset (registered in dataset_info.json): its output folder and
    its log. With `processes` > 1, LLaMA-Factory's own route to torchrun: `FORCE_TORCHRUN=1` and `NPROC_PER_NODE` (it
    counts no device on a CPU), gloo."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"instruction": f"Say something about item {i}.", "input": "", "output": f"Item {i} is small."}
            for i in range(16)]
    (data / "tiny.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    output_dir = str(tmp_path / "lf_out")
    (tmp_path / "train.yaml").write_text(_yaml(model_path, str(start), str(data), output_dir))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    if processes > 1:
        # LLaMA-Factory runs `torchrun` from PATH: that of its own environment
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(processes), MASTER_PORT=str(29600 + os.getpid() % 1000),
                   PATH=os.path.join(LLAMAFACTORY_VENV, "bin") + os.pathsep + env.get("PATH", ""))
    # a process left waiting in a collective would hang the test: the timeout ends it as a failure
    result = subprocess.run([LLAMAFACTORY_CLI, "train", str(tmp_path / "train.yaml")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    (tmp_path / "llamafactory.log").write_text(log)
    assert result.returncode == 0, log[-4000:]
    assert f"Loaded adapter(s): {start}" in log, log[-4000:]
    assert "Quantizing model to 4 bit" in log, log[-4000:]
    return output_dir, log


def _init_start(tmp_path, model_path, texts):
    """`hf-quailora init`: the QuAILoRA start (r = 4, all linear layers, NF4), in `tmp_path/start`."""
    from hf_quailora.cli import main

    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(texts))
    start = tmp_path / "start"
    assert main(["init", "--model_name_or_path", model_path, "--load_in_4bit", "--lora_r", "4",
                 "--lora_target_modules", "all-linear", "--calibration_dataset", str(calibration),
                 "--calibration_samples", "4", "--calibration_length", "32", "--show_progress", "false",
                 "--output_dir", str(start)]) == 0
    return start


@require_llamafactory
@require_bitsandbytes
def test_a_start_trained_by_llamafactory_is_read_back_at_constant_scaling(tiny_model_path, tiny_texts, tmp_path):
    from hf_quailora.cli import main

    start = _init_start(tmp_path, tiny_model_path, tiny_texts)
    output_dir, _ = _train_in_llamafactory(tmp_path, tiny_model_path, start)

    # It trained the start's factors (not new ones): every factor moved, by little (3 steps at lr 1e-3)
    before = load_file(start / "adapter_model.safetensors")
    after = load_file(os.path.join(output_dir, "adapter_model.safetensors"))
    assert sorted(after) == sorted(before) and len(before) == 28
    for name, tensor in before.items():
        change = (after[name].float() - tensor.float()).norm() / tensor.float().norm()
        assert 0 < change < 0.2, (name, change)
    losses = [json.loads(line)["loss"] for line in open(os.path.join(output_dir, "trainer_log.jsonl"))
              if "loss" in json.loads(line)]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)

    # What it saved: peft 0.18.1 keeps the LoraConfig's auto_mapping facts; no dynamic_rank.json
    config = json.loads(open(os.path.join(output_dir, "adapter_config.json")).read())
    assert (config["r"], config["lora_alpha"]) == (4, 4)
    assert config["auto_mapping"][CONFIG_FACTS_KEY] == {"quailora": True, "rank_scaling": "constant",
                                                        "min_rank": 1, "max_rank": 4}
    assert not os.path.exists(os.path.join(output_dir, METADATA_FILE))
    saved = read_saved_adapter(output_dir)  # the facts stand in for the missing file, without the base quantization
    assert (saved.metadata.quailora, saved.metadata.rank_scaling, saved.metadata.quantization) == (
        True, "constant", None)
    with pytest.raises(ValueError, match="does not record the quantization of the base"):
        load_dynamic_rank_adapter(tiny_model_path, output_dir)  # never silently on the full-precision base

    loaded = load_dynamic_rank_adapter(tiny_model_path, output_dir, quantization="nf4")
    assert (loaded.rank_scaling, loaded.max_rank) == ("constant", 4)
    trained = {name: param for name, param in loaded.model.named_parameters() if "lora_" in name}
    assert len(trained) == 28
    torch.testing.assert_close(
        trained["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].float(),
        after["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float())

    assert main(["eval", "--model", tiny_model_path, "--adapter", output_dir, "--quantization", "nf4", "--ranks", "2,4",
                 "--tasks", "quailora_wiki_ppl", "--limit", "1", "--max_length", "4096",
                 "--output_dir", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert {row["rank"] for row in rows} == {None, 2, 4}  # truncations evaluated, with the base alone
    assert main(["export", "--model", tiny_model_path, "--adapter", output_dir, "--quantization", "nf4",
                 "--rank", "2", "--output_dir", str(tmp_path / "r2")]) == 0
    exported = DynamicRankMetadata.load(tmp_path / "r2")
    assert (exported.rank_scaling, exported.quailora, exported.quantization, exported.exported_rank) == (
        "constant", True, "nf4", 2)
    # ... and with the start's dynamic_rank.json copied beside it, no quantization needs to be given
    (tmp_path / "lf_out" / METADATA_FILE).write_bytes((start / METADATA_FILE).read_bytes())
    assert load_dynamic_rank_adapter(tiny_model_path, output_dir).rank_scaling == "constant"


@require_llamafactory
@require_bitsandbytes
def test_llamafactory_trains_a_start_on_two_processes(tiny_model_path, tiny_texts, tmp_path):
    from hf_quailora.cli import main

    start = _init_start(tmp_path, tiny_model_path, tiny_texts)
    output_dir, log = _train_in_llamafactory(tmp_path, tiny_model_path, start, processes=2)

    # LLaMA-Factory's own torchrun launch: two processes of one DDP run on the CPU (gloo)
    assert "Initializing 2 distributed tasks" in log, log[-4000:]
    for rank in (0, 1):
        assert f"Process rank: {rank}, world size: 2, device: cpu:0, distributed training: True" in log, log[-4000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in log, log[-4000:]  # 2 x 2
    before = load_file(start / "adapter_model.safetensors")
    after = load_file(os.path.join(output_dir, "adapter_model.safetensors"))
    assert sorted(after) == sorted(before)
    assert all(not torch.equal(after[name], tensor) for name, tensor in before.items())  # the start's factors trained
    config = json.loads(open(os.path.join(output_dir, "adapter_config.json")).read())
    assert config["auto_mapping"][CONFIG_FACTS_KEY]["rank_scaling"] == "constant"

    # hf_quailora's readers on what the two processes saved, in this environment
    assert main(["eval", "--model", tiny_model_path, "--adapter", output_dir, "--quantization", "nf4", "--ranks", "2",
                 "--tasks", "quailora_wiki_ppl", "--limit", "1", "--max_length", "4096",
                 "--output_dir", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert {row["rank"] for row in rows} == {None, 2}
    assert main(["export", "--model", tiny_model_path, "--adapter", output_dir, "--quantization", "nf4",
                 "--rank", "2", "--output_dir", str(tmp_path / "r2")]) == 0
    exported = DynamicRankMetadata.load(tmp_path / "r2")
    assert (exported.rank_scaling, exported.quailora, exported.exported_rank) == ("constant", True, 2)
