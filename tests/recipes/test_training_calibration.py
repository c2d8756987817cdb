"""`--calibration_dataset train`: the recipes' QuAILoRA start calibrated on their own training examples
(hf_quailora/scripts/calibration.py), in every text format, with C4 when the data are too short."""

import logging
import os
import sys

import datasets
import pytest
import torch

from hf_quailora import QuAILoRAConfig, make_token_windows
from hf_quailora.scripts.calibration import check_training_text, training_calibration, training_texts

from testing_utils import REPO_ROOT, require_bitsandbytes


def test_training_texts_in_every_text_format_and_a_clear_error_without_text(tiny_model_path):
    from transformers import AutoTokenizer

    pc = datasets.Dataset.from_dict({"prompt": ["Q1 ", "Q2 "], "completion": ["A1", "A2"]})
    assert training_texts(pc) == ["Q1 A1", "Q2 A2"]
    chat = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"}]]})
    assert training_texts(chat) == ["hi\nhello"]
    conversational_pc = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]],
                                                    "completion": [[{"role": "assistant", "content": "yo"}]]})
    assert training_texts(conversational_pc) == ["hiyo"]
    text = datasets.Dataset.from_dict({"body": ["one", "two", "three"]})
    assert training_texts(text, text_field="body") == ["one", "two", "three"]
    assert training_texts(text, text_field="body", max_chars=4) == ["one", "two"]  # stops once 4 characters are in
    templated = AutoTokenizer.from_pretrained(tiny_model_path)  # with a chat template: read as the model trains on it
    templated.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert training_texts(chat, tokenizer=templated) == ["<user>hi<assistant>hello"]
    tokenized = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    for call in (lambda: training_texts(tokenized), lambda: check_training_text(tokenized)):
        with pytest.raises(ValueError, match=r"needs text in the training data; its columns are \['input_ids'\]"):
            call()


def test_training_calibration_gives_windows_of_the_training_text_or_c4_when_too_short(tiny_model_path, tiny_texts,
                                                                                      caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    train = datasets.Dataset.from_dict({"prompt": tiny_texts, "completion": [" ok"] * len(tiny_texts)})
    config = QuAILoRAConfig(calibration_samples=3, calibration_length=16)
    with caplog.at_level(logging.INFO, logger="hf_quailora.scripts.calibration"):
        windows = training_calibration(train, tokenizer, config)
    expected = make_token_windows(tokenizer, [t + " ok" for t in tiny_texts], 16, 3)
    assert isinstance(windows, torch.Tensor) and torch.equal(windows, expected)
    assert "calibrates on the training data: 3 windows of 16 tokens" in caplog.text

    caplog.clear()
    short = datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})
    with caplog.at_level(logging.INFO, logger="hf_quailora.scripts.calibration"):
        fallback = training_calibration(short, tokenizer, config)
    assert isinstance(fallback, datasets.Dataset) and "text" in fallback.column_names  # the embedded C4
    assert "fewer than calibration_samples=3: QuAILoRA calibrates on c4 instead" in caplog.text


def test_auto_is_the_training_data_in_a_recipe_that_trains_and_c4_elsewhere():
    from hf_quailora.scripts.calibration import calibration_source

    assert calibration_source("auto", trains=True) == "train"
    assert calibration_source("auto", trains=False) == "c4"
    assert calibration_source("wiki", trains=True) == "wiki" and calibration_source("train", trains=True) == "train"


@require_bitsandbytes
@pytest.mark.parametrize("source", ["train", "auto"])
def test_recipe_calibrates_on_its_training_data(source, tiny_model_path, tmp_path, monkeypatch, caplog):
    import runpy

    out = tmp_path / "run"
    argv = ["alpaca.py", "--config", os.path.join(REPO_ROOT, "recipes", "configs", "alpaca.yaml"),
            "--model_name_or_path", tiny_model_path, "--output_dir", str(out), "--lora_r", "4", "--lora_alpha", "4",
            "--eval_ranks", "4", "--sweep_ranks", "4", "--max_steps", "1", "--eval_steps", "1", "--save_steps", "1",
            "--num_eval_examples", "2", "--num_train_examples", "16", "--max_length", "512",
            "--calibration_dataset", source, "--calibration_samples", "4", "--calibration_length", "32",
            "--sweep_tasks", "", "--per_device_train_batch_size", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with caplog.at_level(logging.INFO, logger="hf_quailora.scripts.calibration"):
        runpy.run_path(os.path.join(REPO_ROOT, "recipes", "alpaca.py"), run_name="__main__")
    assert "calibrates on the training data: 4 windows of 32 tokens from" in caplog.text
    assert (out / "quailora_report.json").is_file()


def test_calibration_windows_start_with_bos_where_the_tokenizer_does(gemma3_path, tiny_model_path):
    """Gemma needs BOS first (its tokenizer adds it to every text): windows cut from a token stream for
    `hf-quailora init` and `--calibration_dataset train` get it too; the tiny Llama's tokenizer adds none."""
    from transformers import AutoTokenizer

    from hf_quailora.tokens import tokenizer_adds_bos

    gemma = AutoTokenizer.from_pretrained(gemma3_path)
    assert tokenizer_adds_bos(gemma) and not tokenizer_adds_bos(AutoTokenizer.from_pretrained(tiny_model_path))
    train = datasets.Dataset.from_dict({"text": ["The cat sat on the mat. " * 40] * 4})
    windows = training_calibration(train, gemma, QuAILoRAConfig(calibration_samples=2, calibration_length=32))
    assert windows.shape == (2, 32) and (windows[:, 0] == gemma.bos_token_id).all()
