"""The plan of the streamed init: the budget parsed once, one check with one message, the devices named once."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_quailora.quailora.config as config_module
import hf_quailora.quailora.schedule as schedule_module
from hf_quailora import QuAILoRAConfig
from hf_quailora.quailora.memory import group_blocks
from hf_quailora.quailora.schedule import plan_schedule


BLOCK_BYTES = (64**2 * 6 + 128**2) * 4  # the seven layers of one block of the model below, float32 Gram matrices


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2))


def in_features(model) -> dict[str, int]:
    return {name: module.in_features for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


def test_the_budget_is_parsed_once_and_read_by_the_schedule(model, monkeypatch):
    calls = []
    parse = config_module.parse_memory_budget
    monkeypatch.setattr(config_module, "parse_memory_budget", lambda value: calls.append(value) or parse(value))
    config = QuAILoRAConfig(streaming="passes", memory_budget=str(2 * BLOCK_BYTES))
    schedule = plan_schedule(model, in_features(model), config)
    assert calls == [str(2 * BLOCK_BYTES)]  # at construction (bad input fails before work), never again
    assert [len(group) for group in schedule.groups] == [14, 7]  # two blocks fit, then the third
    config.memory_budget = "1GiB"  # changed after construction: parsed again, once
    assert config.memory_budget_bytes == 2**30 and config.memory_budget_bytes == 2**30 and len(calls) == 2


@pytest.mark.parametrize("gram_device, expected", [("cpu", torch.device("cpu")), ("model", None)])
def test_the_schedule_names_the_devices(model, gram_device, expected):
    schedule = plan_schedule(model, in_features(model), QuAILoRAConfig(gram_device=gram_device))
    assert schedule.mode == "replay" and len(schedule.groups) == 3
    assert schedule.gram_device == expected and schedule.memory_device == next(model.parameters()).device


def test_one_check_one_message_for_a_budget_and_for_free_memory(model, monkeypatch):
    names = in_features(model)
    with pytest.raises(ValueError, match=rf"cannot stream even one block: model\.layers\.0 needs .*\({BLOCK_BYTES} "
                                         r"bytes\) of Gram matrices, more than `memory_budget` \(.*'auto'"):
        plan_schedule(model, names, QuAILoRAConfig(streaming="passes", memory_budget=BLOCK_BYTES - 1))
    monkeypatch.setattr(schedule_module, "free_memory", lambda device: BLOCK_BYTES - 1)
    with pytest.raises(ValueError, match=rf"cannot stream even one block: model\.layers\.0 needs .*\({BLOCK_BYTES} "
                                         r"bytes\) of Gram matrices, more than the free memory of cpu"):
        plan_schedule(model, names, QuAILoRAConfig(streaming="replay"))
    monkeypatch.setattr(schedule_module, "free_memory", lambda device: 4 * BLOCK_BYTES)  # passes: half of free
    assert [len(group) for group in plan_schedule(model, names, QuAILoRAConfig(streaming="passes")).groups] == [14, 7]


def test_group_blocks_fills_consecutive_groups():
    assert group_blocks([3, 3, 3], 6) == [[0, 1], [2]]
    assert group_blocks([1, 5, 1, 1], 6) == [[0, 1], [2, 3]]
