"""recipes/alpaca.py end to end at a reduced size (tiny model), its configs, and its argument checks."""

import json
import os
import runpy
import sys

import pytest

from hf_quailora import QuAILoRAConfig
from hf_quailora.scripts import build_quantization_config

from testing_utils import REPO_ROOT, require_bitsandbytes


RECIPE = os.path.join(REPO_ROOT, "recipes", "alpaca.py")
CONFIGS = os.path.join(REPO_ROOT, "recipes", "configs")


def load_recipe():
    return runpy.run_path(RECIPE)  # not as __main__: gives main / parse_args_and_config


@require_bitsandbytes
def test_cpu_demo_config_runs_end_to_end_and_writes_every_file(tiny_model_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["alpaca.py", "--config", os.path.join(CONFIGS, "alpaca.yaml"), "--model_name_or_path", tiny_model_path,
            "--output_dir", str(out), "--lora_r", "8", "--lora_alpha", "8", "--eval_ranks", "1", "8",
            "--max_steps", "2", "--eval_steps", "1", "--save_steps", "1",
            "--num_eval_examples", "4", "--num_train_examples", "16", "--max_length", "512",
            "--calibration_samples", "4", "--calibration_length", "32", "--sweep_ranks", "2,8", "--sweep_limit", "1",
            "--export_ranks", "2", "--per_device_train_batch_size", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(RECIPE, run_name="__main__")
    printed = capsys.readouterr().out
    assert "Written to" in printed
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/dynamic_rank.json",
                 "adapter-r2/adapter_config.json", "results.md", "results.json", "results.png", "summary.json",
                 "quailora_report.json"):
        assert (out / name).is_file(), name
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((out / "summary.json").read_text())
    for b in (1, 8):
        assert summary["initial_metrics"][f"eval_loss@r{b}"] > 0  # eval_on_start: at the QuAILoRA start
        assert summary["final_metrics"][f"eval_loss@r{b}"] > 0
    rows = json.loads((out / "results.json").read_text())
    assert {row["task"] for row in rows} == {"alpaca held-out", "quailora_wiki_ppl"}
    assert json.loads((out / "adapter-r2" / "adapter_config.json").read_text())["r"] == 2
    for adapter in ("adapter", "adapter-r2"):  # both record the NF4 base they belong on (make demo's adapter-r4 too)
        assert json.loads((out / adapter / "dynamic_rank.json").read_text())["quantization"] == "nf4"
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())  # checkpoints kept for resume


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def write_dataset(folder, kind: str) -> str:
    """A small local JSON dataset in one of trl's formats (10 rows)."""
    rows = []
    for i in range(10):
        question, answer = f"What is {i} plus one?", f"It is {i + 1}."
        if kind == "conversational":
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
        else:
            rows.append({"text": f"{question} {answer}", "source": "made up"})  # an extra column trl ignores
    path = folder / f"{kind}.json"
    path.write_text(json.dumps(rows))
    return str(path)


@require_bitsandbytes
@pytest.mark.parametrize("kind", ["conversational", "text"])
def test_trl_flags_and_trl_dataset_formats_run_end_to_end(kind, tiny_model_path, tmp_path, monkeypatch, capsys):
    """No --config: trl's flags (4-bit, LoRA r = 4 on q_proj and v_proj) on a messages or a text dataset."""
    out = tmp_path / "run"
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    argv = ["alpaca.py", "--model_name_or_path", tiny_model_path, "--load_in_4bit", "--use_peft", "--lora_r", "4",
            "--lora_target_modules", "q_proj", "v_proj", "--dataset_name", write_dataset(tmp_path, kind),
            "--eval_holdout", "2", "--num_eval_examples", "2", "--output_dir", str(out), "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--max_length", "64", "--eval_ranks", "1", "4",
            "--calibration_samples", "2", "--calibration_length", "32", "--sweep_tasks", "", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "true",
            *(["--chat_template_path", str(tmp_path / "chat.jinja")] if kind == "conversational" else [])]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(RECIPE, run_name="__main__")
    assert "Written to" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_train_examples"] == 8 and summary["final_metrics"]["eval_loss@r4"] > 0
    before, after = summary["initial_metrics"]["eval_loss@r4"], summary["final_metrics"]["eval_loss@r4"]
    assert before != after  # evaluated before QuAILoRA and after its start and one training step
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((out / "adapter" / "dynamic_rank.json").read_text())["quantization"] == "nf4"
    assert (out / "quailora_report.json").is_file()  # QuAILoRA ran on the two target modules


def test_conversational_data_without_a_chat_template_fail_before_the_model_loads(tiny_model_path, tmp_path):
    import shutil

    tokenizer_only = tmp_path / "tokenizer-only"  # the tiny tokenizer (no chat template) and no weights at all
    shutil.copytree(tiny_model_path, tokenizer_only, ignore=shutil.ignore_patterns("*.safetensors"))
    recipe = load_recipe()
    args = ["--model_name_or_path", str(tokenizer_only), "--dataset_name", write_dataset(tmp_path, "conversational"),
            "--eval_holdout", "2", "--num_eval_examples", "2", "--output_dir", str(tmp_path / "run"),
            "--sweep_tasks", "", "--use_cpu", "true"]
    with pytest.raises(ValueError, match="conversational, but the tokenizer .* has no chat template"):
        recipe["main"](*recipe["parse_args_and_config"](args=args))


@pytest.mark.parametrize("name", ["alpaca.yaml", "alpaca_gpu.yaml", "alpaca_multi_gpu.yaml"])
def test_configs_parse(name, tmp_path):
    recipe = load_recipe()
    extra = [] if name == "alpaca.yaml" else ["--bf16", "false"]  # CI has no GPU; bf16 needs one
    data_args, training_args, model_args, recipe_args, quailora_args = recipe["parse_args_and_config"](
        args=["--config", os.path.join(CONFIGS, name), "--output_dir", str(tmp_path), *extra]
    )
    assert model_args.lora_r >= max(training_args.eval_ranks)
    assert training_args.update_rule in ("nested", "frozen")
    assert model_args.quantization == "nf4" and build_quantization_config(model_args).bnb_4bit_use_double_quant
    assert quailora_args.solver == "closed_form" and quailora_args.calibration_samples in (32, 128)
    # the GPU configs warm up for 30 steps; a `constant` schedule would drop that (DynamicRankConfig refuses it)
    assert training_args.warmup_steps == 0 or training_args.lr_scheduler_type == "constant_with_warmup"


def test_demo_config_gives_the_quailora_settings_it_gave_before(tmp_path):
    """alpaca.yaml, unchanged, keeps every QuAILoRA setting: 32 × 256 calibration tokens, batches of 8, closed form,
    the library's other defaults; the training length (`max_length: 192`) stays SFTConfig's."""
    import dataclasses
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its `quailora_solver` is the former name of `solver`
        _, training_args, _, recipe_args, quailora_args = load_recipe()["parse_args_and_config"](
            args=["--config", os.path.join(CONFIGS, "alpaca.yaml"), "--output_dir", str(tmp_path)])
    expected = dataclasses.asdict(QuAILoRAConfig(calibration_samples=32, calibration_length=256))
    assert dataclasses.asdict(quailora_args) == expected and training_args.max_length == 192
    assert recipe_args.quailora and recipe_args.calibration_dataset == "auto"  # the training data since issue 36


def test_no_arguments_means_the_dataclass_defaults_not_the_demo_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # TrainingArguments' default output_dir is relative
    data_args, training_args, model_args, recipe_args, quailora_args = load_recipe()["parse_args_and_config"](args=[])
    assert model_args.model_name_or_path == "smollm2-135m" and data_args.dataset_name == "alpaca"  # offline-safe
    assert model_args.quantization == "nf4" and model_args.use_peft and model_args.lora_target_modules == "all-linear"
    assert training_args.max_steps == -1 and training_args.output_dir != "outputs/alpaca"  # not alpaca.yaml's 20
    demo = load_recipe()["parse_args_and_config"](args=["--config", os.path.join(CONFIGS, "alpaca.yaml")])
    assert demo[1].max_steps == 20 and demo[1].output_dir == "outputs/alpaca"


@pytest.mark.parametrize("override, match", [
    (["--lora_r", "0"], "lora_r"),
    (["--sweep_ranks", "1,64"], "sweep_ranks"),
    (["--export_ranks", "32"], "export_ranks"),
    (["--max_rank", "8", "--eval_ranks", "1", "8", "--sweep_ranks", "1,16"],
     "`sweep_ranks` holds rank 16, outside the trained"),
    (["--eval_ranks", "1", "32"], "`eval_ranks` holds rank 32"),
    (["--num_eval_examples", "500"], "num_eval_examples"),
    (["--num_train_examples", "0"], "num_train_examples"),
    (["--eval_holdout", "5000"], r"hold-out \(5000\) must be an integer between 1 and 998"),
    (["--dataset_name", "alpacca"], "'alpacca' is neither an embedded dataset"),
    (["--dataset_name", "{tmp}/empty.json"], "Could not read .*empty.json as a dataset"),
    (["--calibration_dataset", "c44"], "'c44' is neither an embedded dataset"),
    (["--quantization", "none"], "quantized base"),
    (["--damping", "-1"], r"`damping` \(-1.0\)"),
    (["--quailora_damping", "-1"], "damping"),  # the former flag, renamed
    (["--calibration_samples", "0"], r"`calibration_samples` \(0\) must be a positive integer"),
    (["--sweep_tasks", "quailora_wiki_ppl", "--sweep_limit", "0"], "`limit` must be a positive number"),
    (["--sweep_tasks", "hellaswag_offline_nope"], "Unknown lm-eval task"),
    (["--memory_budget", "0"], "memory_budget"),
    (["--output_dir", "{tmp}/a_file"], "is an existing file, not a folder"),
    # trl's ModelConfig flags
    (["--load_in_4bit", "--load_in_8bit"], "`--load_in_4bit` and `--load_in_8bit` were both given"),
    (["--quantization", "int8", "--load_in_4bit"], "`--quantization int8` contradicts `--load_in_4bit`"),
    (["--quantization", "fp4", "--bnb_4bit_quant_type", "nf4"], "`--quantization fp4` contradicts `--bnb_4bit_quant"),
    (["--load_in_8bit", "--bnb_4bit_quant_type", "fp4"], "`--bnb_4bit_quant_type fp4` applies to 4-bit loading"),
    (["--use_peft", "false"], "`--use_peft false`: the recipes .* need it"),
    (["--use_dora"], "`--use_dora` is not supported"),
    (["--lora_target_parameters", "mlp.experts.gate_up_proj"], "`--lora_target_parameters`"),
    (["--lora_modules_to_save", "lm_head"], "`--lora_modules_to_save`"),
    (["--lora_task_type", "SEQ_CLS"], "`--lora_task_type` must be CAUSAL_LM"),
    (["--lora_target_modules", ","], "`--lora_target_modules` is empty"),
    (["--solver", "als", "--als_iterations", "-1"], "`als_iterations` \\(-1\\)"),
    # trl's ScriptArguments flags and the data's shape
    (["--dataset_name", "{tmp}/qa.json"], r"has the columns \['answer', 'question'\].*Expected one of: 'messages'"),
    (["--dataset_name", "{tmp}/flat_messages.json"], "`messages` column does not hold a list of messages"),
    (["--dataset_name", "{tmp}/qa.json", "--dataset_config", "en"], "`--dataset_config`"),
    (["--dataset_streaming"], "`--dataset_streaming` is not supported"),
    (["--dataset_name", "{tmp}/text.json", "--eval_holdout", "4", "--num_eval_examples", "4"],
     "`--eval_holdout`: The hold-out \\(4\\) must be an integer between 1 and 2"),
])
def test_bad_arguments_fail_before_loading(override, match, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "qa.json").write_text(json.dumps([{"question": "Why?", "answer": "Because."}] * 3))
    (tmp_path / "flat_messages.json").write_text(json.dumps([{"messages": "user: hi"}] * 3))
    (tmp_path / "text.json").write_text(json.dumps([{"text": "One sentence."}] * 3))
    recipe = load_recipe()
    # A model that cannot load and no lm-eval sweep unless asked: each error must come before the model loads.
    args = ["--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(tmp_path / "no-model"),
            "--sweep_tasks", "", *[arg.format(tmp=tmp_path) for arg in override]]
    with pytest.raises(ValueError, match=match):  # from parsing (the dataclasses' checks) or from main's checks
        recipe["main"](*recipe["parse_args_and_config"](args=args))


def test_sharded_launch_is_refused_before_loading(tmp_path, monkeypatch):
    # What `accelerate launch --use_fsdp` sets: the QuAILoRA start writes whole factors, so it is refused at once.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = load_recipe()
    args = ["--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(tmp_path / "no-model"), "--sweep_tasks", ""]
    with pytest.raises(ValueError, match="cannot initialise under FSDP"):
        recipe["main"](*recipe["parse_args_and_config"](args=args))


def test_zero3_launch_is_refused_before_loading(tmp_path, monkeypatch):
    # What `accelerate launch` sets for ZeRO-3: transformers would partition the model as it loads.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    recipe = load_recipe()
    args = ["--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(tmp_path / "no-model"), "--sweep_tasks", ""]
    with pytest.raises(ValueError, match="(?s)cannot initialise under DeepSpeed ZeRO-3.*hf-quailora init"):
        recipe["main"](*recipe["parse_args_and_config"](args=args))


@require_bitsandbytes
def test_recipe_runs_data_parallel_on_two_processes(tiny_model_path, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU): the whole recipe completes; the trainer raises if ranks ever differ."""
    import subprocess

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29700 + os.getpid() % 200), RECIPE,
               "--config", os.path.join(CONFIGS, "alpaca.yaml"), "--model_name_or_path", tiny_model_path,
               "--output_dir", str(out), "--lora_r", "8", "--lora_alpha", "8", "--eval_ranks", "1", "8",
               "--max_steps", "2", "--save_steps", "1", "--num_eval_examples", "4", "--num_train_examples", "16",
               "--max_length", "512", "--calibration_samples", "4", "--calibration_length", "32",
               "--sweep_ranks", "2,8", "--sweep_limit", "1", "--per_device_train_batch_size", "2",
               "--ddp_backend", "gloo", "--use_cpu", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    # every process's errors, not only the tail (process 0's lm-eval log would hide process 1's)
    errors = [line for line in result.stderr.splitlines() if any(
        word in line for word in ("Error", "error:", "terminate", "Traceback", "Abort", "what()", "[rank1]"))]
    assert result.returncode == 0, "\n".join(errors[-60:]) + "\n...\n" + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_metrics"]["eval_loss@r8"] > 0
    assert (out / "adapter" / "dynamic_rank.json").is_file()


def test_soft_exits_are_checked_against_the_models_depth_before_it_loads(tiny_model_path, tmp_path):
    recipe = load_recipe()
    args = ["--output_dir", str(tmp_path / "run"), "--model_name_or_path", tiny_model_path, "--sweep_tasks", "",
            "--dataset_name", str(tmp_path / "missing.json"), "--soft_exits", "1", "3"]
    with pytest.raises(ValueError, match="`soft_exits` holds exit 3, above the model's 2 layers"):
        recipe["main"](*recipe["parse_args_and_config"](args=args))
