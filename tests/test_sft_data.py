"""Training data in trl's SFT formats: detection, the Alpaca conversion, splits, and the errors before any model."""

import json

import datasets
import pytest

from hf_quailora.scripts import RecipeDataArguments
from hf_quailora.scripts.sft_data import detect_sft_format, load_sft_splits


MESSAGES = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


@pytest.mark.parametrize("columns, expected", [
    ({"messages": [MESSAGES]}, "conversational"),
    ({"conversations": [[{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]]}, "conversational"),
    ({"prompt": ["Hi?"], "completion": [" Hello."]}, "prompt-completion"),
    ({"prompt": [MESSAGES[:1]], "completion": [MESSAGES[1:]]}, "prompt-completion"),
    ({"text": ["Hello."], "id": [1]}, "text"),
    ({"input_ids": [[1, 2, 3]]}, "tokenized"),
    ({"instruction": ["Say hi."], "input": [""], "output": ["Hi."], "text": ["..."]}, "alpaca"),  # tatsu-lab/alpaca
])
def test_every_sft_format_is_recognised(columns, expected):
    assert detect_sft_format(datasets.Dataset.from_dict(columns)) == expected


def test_an_unknown_shape_names_the_columns_found_and_expected():
    with pytest.raises(ValueError, match=r"has the columns \['prompt'\].*'messages'.*'prompt' \+ 'completion'"):
        detect_sft_format(datasets.Dataset.from_dict({"prompt": ["Hi?"]}), "the data")
    custom = datasets.Dataset.from_dict({"body": ["Hello."]})
    assert detect_sft_format(custom, text_field="body") == "text"  # SFTConfig.dataset_text_field


def write(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def test_a_local_file_is_held_out_from_its_end_and_alpaca_becomes_prompt_completion(tmp_path):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
            for i in range(1, 9)]
    args = RecipeDataArguments(dataset_name=write(tmp_path / "a.json", rows), eval_holdout=3, num_eval_examples=2,
                               num_train_examples=4)
    train, held_out, kind = load_sft_splits(args)
    assert kind == "alpaca" and train.column_names == ["prompt", "completion"]
    assert len(train) == 4 and len(held_out) == 2
    assert "Count to 6." in held_out[0]["prompt"] and held_out[0]["completion"] == "0 1 2 3 4 5"


def test_a_folder_with_a_test_split_uses_it(tmp_path):
    folder = tmp_path / "chat"
    folder.mkdir()
    write(folder / "train.json", [{"messages": MESSAGES}] * 5)
    write(folder / "test.json", [{"messages": MESSAGES[:1] + [{"role": "assistant", "content": "Hey."}]}] * 3)
    train, held_out, kind = load_sft_splits(RecipeDataArguments(dataset_name=str(folder), num_eval_examples=2))
    assert kind == "conversational" and len(train) == 5 and len(held_out) == 2  # nothing held out of train
    assert held_out[0]["messages"][1]["content"] == "Hey."
    with pytest.raises(ValueError, match=r"`--dataset_train_split` 'training' is not a split .* \['test', 'train'\]"):
        load_sft_splits(RecipeDataArguments(dataset_name=str(folder), dataset_train_split="training"))


def test_too_few_held_out_examples_name_the_flag(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    write(folder / "train.json", [{"text": "x"}] * 6)
    write(folder / "test.json", [{"text": "y"}] * 2)
    with pytest.raises(ValueError, match=r"`--num_eval_examples` \(3\) exceeds the 2 held-out"):
        load_sft_splits(RecipeDataArguments(dataset_name=str(folder), num_eval_examples=3))
    with pytest.raises(ValueError, match="`--eval_holdout`"):
        load_sft_splits(RecipeDataArguments(dataset_name=str(folder / "train.json"), eval_holdout=6,
                                            num_eval_examples=1))
