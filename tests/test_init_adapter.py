"""`hf-quailora init`: a QuAILoRA start saved as a peft adapter, whose metadata every reader honours, across
processes (hf_quailora/scripts/init_adapter.py)."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from hf_quailora import DynamicRankMetadata, QuAILoRAConfig, export_rank, load_dynamic_rank_adapter, quailora_init
from hf_quailora._peft_utils import CONFIG_FACTS_KEY, adapter_facts
from hf_quailora.dynamic_rank.saved_adapter import read_saved_adapter
from hf_quailora.dynamic_rank.spec import METADATA_FILE, resolve_rank_scaling
from hf_quailora.scripts.init_adapter import REPORT_FILE, init_adapter, make_parser, save_quailora_start

from testing_utils import REPO_ROOT, SCRIPTS_DIR, TINY_LINEAR_LAYERS, make_model, require_bitsandbytes


def _argv(model_path, texts_file, output_dir, *extra):
    return ["--model_name_or_path", model_path, "--lora_r", "4", "--calibration_dataset", str(texts_file),
            "--calibration_samples", "4", "--calibration_length", "32", "--show_progress", "false",
            "--output_dir", str(output_dir), *extra]


@pytest.fixture
def texts_file(tmp_path, tiny_texts):
    path = tmp_path / "calibration.txt"
    path.write_text("\n".join(tiny_texts))
    return path


@require_bitsandbytes
def test_a_start_reloaded_in_a_fresh_process_trains_at_constant_scaling_and_gives_the_same_logits(
    tiny_model_path, texts_file, tmp_path
):
    folder = tmp_path / "start"
    model, report = init_adapter(*make_parser().parse_args_and_config(_argv(tiny_model_path, texts_file, folder)))
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        in_memory = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")

    # What the folder records
    metadata = DynamicRankMetadata.load(folder)
    assert (metadata.quailora, metadata.rank_scaling, metadata.quantization) == (True, "constant", "nf4")
    assert (metadata.min_rank, metadata.max_rank, metadata.exported_rank) == (1, 4, None)
    assert metadata.calibration == {"dataset": str(texts_file), "samples": 4, "length": 32,
                                    "tokens": report.num_tokens, "solver": "closed_form", "damping": 1e-4}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["auto_mapping"][CONFIG_FACTS_KEY] == {"quailora": True, "rank_scaling": "constant",
                                                        "min_rank": 1, "max_rank": 4}
    assert len(json.loads((folder / REPORT_FILE).read_text())["layers"]) == TINY_LINEAR_LAYERS

    # A fresh process: plain PeftModel.from_pretrained, then 2 DynamicRankTrainer steps
    out = tmp_path / "child"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.join(SCRIPTS_DIR, "train_quailora_start.py"), tiny_model_path, str(folder),
               str(tmp_path / "ids.pt"), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    child = torch.load(out / "result.pt", weights_only=False)
    assert child["rank_scaling"] == "constant"
    assert len(child["rank_history"]) == 2
    about_scaling = [w for w in child["warnings"] + child["log_records"] if "scaling" in w or "QuAILoRA" in w]
    assert not about_scaling, about_scaling
    assert not child["log_records"], child["log_records"]
    torch.testing.assert_close(child["logits"], in_memory, rtol=1e-5, atol=1e-5)
    # ... and what that trainer saves still says QuAILoRA and constant
    trained = DynamicRankMetadata.load(out / "trained")
    assert (trained.quailora, trained.rank_scaling, trained.quantization) == (True, "constant", "nf4")


@require_bitsandbytes
def test_every_reader_honours_the_metadata_of_a_start(tiny_model_path, texts_file, tmp_path):
    from hf_quailora.cli import main

    folder = tmp_path / "start"
    assert main(["init", *_argv(tiny_model_path, texts_file, folder, "--solver", "svd")]) == 0
    saved = read_saved_adapter(folder)
    assert (saved.max_rank, saved.metadata.rank_scaling) == (4, "constant")
    assert saved.metadata.calibration["solver"] == "svd"
    card = (folder / "README.md").read_text()  # the deployment card: how to load it, and never on the fp base
    assert card.count("<!-- hf_quailora: deployment -->") == 1 and "merged" in card
    loaded = load_dynamic_rank_adapter(tiny_model_path, folder)  # the base quantization comes from the file
    assert (loaded.rank_scaling, loaded.max_rank) == ("constant", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_rank(loaded.model, 2, str(tmp_path / "r2"))
    exported = DynamicRankMetadata.load(tmp_path / "r2")
    assert (exported.rank_scaling, exported.quailora, exported.exported_rank, exported.calibration) == (
        "constant", True, 2, None)
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["auto_mapping"][CONFIG_FACTS_KEY]["max_rank"] == 2
    with pytest.raises(ValueError, match="already holds an adapter"):
        main(["init", *_argv(tiny_model_path, texts_file, folder)])


@require_bitsandbytes
def test_quailora_init_then_peft_save_pretrained_keeps_the_fact(tiny_model_path, tiny_texts, tmp_path):
    """The issue's case: quailora_init, peft's own save_pretrained, plain from_pretrained (a LoraConfig with a
    task_type, as trl's get_peft_config and the recipes make)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_quailora import load_quantized_model

    base, tokenizer = load_quantized_model(tiny_model_path, "nf4")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    quailora_init(model, tiny_texts, QuAILoRAConfig(calibration_samples=4, calibration_length=32), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(load_quantized_model(tiny_model_path, "nf4")[0], tmp_path / "a",
                                         is_trainable=True)
    assert adapter_facts(reloaded)["quailora"] is True
    assert resolve_rank_scaling(reloaded, None, callbacks=[]) == "constant"
    assert not (tmp_path / "a" / METADATA_FILE).exists()  # the fact travelled inside adapter_config.json


def test_save_quailora_start_refuses_a_model_quailora_did_not_initialise(tiny_model_path, tmp_path):
    model, _ = make_model(tiny_model_path)
    with pytest.raises(ValueError, match="not initialised by quailora_init"):
        save_quailora_start(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_init_refuses_a_full_precision_base_before_loading(tiny_model_path, texts_file, tmp_path):
    args = make_parser().parse_args_and_config(_argv(tiny_model_path, texts_file, tmp_path / "x", "--quantization",
                                                     "none"))
    with pytest.raises(ValueError, match="quantized base"):
        init_adapter(*args)


def test_init_calibrates_auto_on_c4_and_refuses_training_data_it_does_not_have(tiny_model_path, tmp_path):
    from hf_quailora.scripts.calibration import calibration_source

    args = make_parser().parse_args_and_config(_argv(tiny_model_path, "auto", tmp_path / "x"))
    assert calibration_source(args[2].calibration_dataset, trains=False) == "c4"
    args = make_parser().parse_args_and_config(_argv(tiny_model_path, "train", tmp_path / "x"))
    with pytest.raises(ValueError, match="`--calibration_dataset train` calibrates a training recipe's start"):
        init_adapter(*args)
    assert not (tmp_path / "x").exists()


def test_metadata_calibration_is_optional_and_older_files_still_load(tmp_path):
    DynamicRankMetadata(max_rank=4, quantization="nf4").save(tmp_path)
    assert json.loads((tmp_path / METADATA_FILE).read_text())["calibration"] is None
    assert DynamicRankMetadata.load(tmp_path).calibration is None
    (tmp_path / METADATA_FILE).write_text(json.dumps({"max_rank": 4, "rank_scaling": "constant", "future": 1}))
    assert DynamicRankMetadata.load(tmp_path).calibration is None
    record = {"dataset": "c4", "tokens": 128, "solver": "als"}
    DynamicRankMetadata(max_rank=4, quantization="nf4", calibration=record).save(tmp_path)
    assert DynamicRankMetadata.load(tmp_path).calibration == record
    with pytest.raises(TypeError, match="calibration"):
        DynamicRankMetadata(max_rank=4, calibration="c4")
