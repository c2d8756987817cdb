"""Exports never replace the adapter they come from, nor another one unless asked, and never half-exist; loading a
saved adapter checks it (and the ranks asked for) before the base model loads, and puts it on the right base."""

import json
import os

import pytest
from transformers import AutoModelForCausalLM

from hf_quailora import DynamicRankMetadata, export_rank
from hf_quailora._peft_utils import record_adapter_facts
from hf_quailora.dynamic_rank.export import load_dynamic_rank_adapter
from hf_quailora.dynamic_rank.saved_adapter import read_saved_adapter
from hf_quailora.dynamic_rank.spec import METADATA_FILE

from testing_utils import R, make_model, require_bitsandbytes, save_adapter


MISSING_BASE = "/nonexistent/base-model"  # a base that cannot load: an error about anything else came first


def folder_state(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def leftovers(parent):
    return [name for name in os.listdir(parent) if ".tmp-" in name]


# Where an export may write


def test_export_refuses_the_folder_its_adapter_was_loaded_from(tiny_model_path, tmp_path):
    folder = save_adapter(tiny_model_path, tmp_path / "adapter")
    before = folder_state(tmp_path / "adapter")
    loaded = load_dynamic_rank_adapter(tiny_model_path, folder)
    with pytest.raises(ValueError, match="is the folder of the adapter being exported"):
        export_rank(loaded.model, 4, folder, overwrite=True)
    assert folder_state(tmp_path / "adapter") == before


def test_export_refuses_to_replace_another_adapter_unless_told_to_overwrite(tiny_model_path, tmp_path):
    model, _ = make_model(tiny_model_path)
    model.save_pretrained(tmp_path / "full")  # e.g. trainer.save_model's folder
    DynamicRankMetadata.for_model(model, max_rank=R).save(tmp_path / "full")
    before = folder_state(tmp_path / "full")
    with pytest.raises(ValueError, match="already holds an adapter .* pass overwrite=True"):
        export_rank(model, 4, str(tmp_path / "full"))
    assert folder_state(tmp_path / "full") == before
    export_rank(model, 4, str(tmp_path / "full"), overwrite=True)
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["r"] == 4


def test_export_replaces_its_own_earlier_export(tiny_model_path, tmp_path):
    model, _ = make_model(tiny_model_path)
    export_rank(model, 2, str(tmp_path / "r"))
    export_rank(model, 4, str(tmp_path / "r"))
    assert json.loads((tmp_path / "r" / "adapter_config.json").read_text())["r"] == 4
    assert DynamicRankMetadata.load(tmp_path / "r").exported_rank == 4
    assert leftovers(tmp_path) == []


def test_export_into_an_existing_file_is_refused(tiny_model_path, tmp_path):
    model, _ = make_model(tiny_model_path)
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        export_rank(model, 2, str(tmp_path / "taken"))


def test_an_interrupted_export_leaves_no_folder_that_loads_as_an_adapter(tiny_model_path, tmp_path, monkeypatch):
    model, _ = make_model(tiny_model_path)
    export_rank(model, 2, str(tmp_path / "earlier"))
    earlier = folder_state(tmp_path / "earlier")

    def interrupted(self, folder):
        raise KeyboardInterrupt  # after the weights, before the metadata and the config

    monkeypatch.setattr(DynamicRankMetadata, "save", interrupted)
    for name in ("new", "earlier"):
        with pytest.raises(KeyboardInterrupt):
            export_rank(model, 4, str(tmp_path / name))
    assert not (tmp_path / "new").exists()
    assert folder_state(tmp_path / "earlier") == earlier  # the complete earlier export, untouched
    assert leftovers(tmp_path) == []


def test_export_refuses_ranks_above_the_trained_max_rank(tiny_model_path, tmp_path):
    model, _ = make_model(tiny_model_path)
    record_adapter_facts(model, max_rank=4)  # what DynamicRankTrainer(max_rank=4) and the loader record
    with pytest.raises(ValueError, match="above this adapter's max_rank 4: .* never trained"):
        export_rank(model, 8, str(tmp_path / "r8"))
    assert not (tmp_path / "r8").exists()


# Loading: checked before the base loads, on the base it was trained on, up to its trained rank


def test_loading_a_missing_or_foreign_folder_fails_before_the_base_loads(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_dynamic_rank_adapter(MISSING_BASE, tmp_path / "nope")
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no adapter_config.json.*Adapters inside it: .*adapter"):
        load_dynamic_rank_adapter(MISSING_BASE, tmp_path / "run")


def test_a_broken_metadata_file_fails_before_the_base_loads_naming_the_file(tiny_model_path, tmp_path):
    folder = save_adapter(tiny_model_path, tmp_path / "adapter")
    for text, match in [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                        ('{"max_rank": 8, "rank_scaling": "alpha"}', "`rank_scaling` must be one of"),
                        ('{"max_rank": 8, "quantization": "nf8"}', "`quantization` must be one of"),
                        ('{"rank_scaling": "constant"}', "has no `max_rank`")]:
        (tmp_path / "adapter" / METADATA_FILE).write_text(text)
        with pytest.raises(ValueError, match=f"dynamic_rank.json.*{match}"):
            load_dynamic_rank_adapter(MISSING_BASE, folder)


def test_metadata_with_a_max_rank_above_the_lora_r_is_refused(tiny_model_path, tmp_path):
    folder = save_adapter(tiny_model_path, tmp_path / "adapter", r=4)
    (tmp_path / "adapter" / METADATA_FILE).write_text(json.dumps({"max_rank": 8, "quantization": "none"}))
    with pytest.raises(ValueError, match="records max_rank 8, above the adapter's LoRA r 4"):
        read_saved_adapter(folder)


def test_an_old_metadata_file_without_the_base_quantization_is_refused_unless_given(tiny_model_path, tmp_path):
    folder = save_adapter(tiny_model_path, tmp_path / "adapter", max_rank=None)
    (tmp_path / "adapter" / METADATA_FILE).write_text(json.dumps({"rank": 8, "rank_scaling": "constant",
                                                                  "max_rank": 16}))  # hf_quailora 0.1's export
    with pytest.raises(ValueError, match="does not record the quantization of the base"):
        load_dynamic_rank_adapter(MISSING_BASE, folder)
    loaded = load_dynamic_rank_adapter(tiny_model_path, folder, quantization="none")
    assert loaded.max_rank == 8


def test_the_loaded_adapter_reports_its_recorded_max_rank(tiny_model_path, tmp_path):
    folder = save_adapter(tiny_model_path, tmp_path / "adapter", max_rank=4)  # LoRA r 8, trained up to 4
    loaded = load_dynamic_rank_adapter(tiny_model_path, folder)
    assert loaded.max_rank == 4
    with pytest.raises(ValueError, match="above this adapter's max_rank 4"):
        export_rank(loaded.model, 8, str(tmp_path / "r8"))


@require_bitsandbytes
def test_a_given_base_quantized_otherwise_than_the_adapter_was_trained_on_is_refused(tiny_model_path, tmp_path):
    folder = save_adapter(tiny_model_path, tmp_path / "adapter", quantization="nf4")
    full_precision = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="quantized as 'none', but .* needs a 'nf4' base"):
        load_dynamic_rank_adapter(full_precision, folder)


# No silent double correction: every adapter folder says which base it belongs to, and loaders refuse another one


def card_of(folder):
    return (folder / "README.md").read_text()


def test_an_export_carries_a_model_card_naming_its_base_and_the_double_correction(tiny_model_path, tmp_path):
    model, _ = make_model(tiny_model_path)
    record_adapter_facts(model, quailora=True)
    export_rank(model, 4, str(tmp_path / "r4"), rank_scaling="constant")
    card = card_of(tmp_path / "r4")
    assert "trained on a **none** base" in card and "hf-quailora export --merged" not in card  # W is its own base
    (tmp_path / "r4" / "README.md").write_text("# My notes\n\nkept\n")
    export_rank(model, 2, str(tmp_path / "r4"), rank_scaling="constant")
    card = card_of(tmp_path / "r4")
    assert card.startswith("# My notes") and card.count("## Deployment (hf_quailora)") == 1


@require_bitsandbytes
def test_a_quailora_export_on_nf4_warns_against_the_full_precision_base_with_the_numbers(tiny_model_path, tmp_path):
    model, _ = make_model(tiny_model_path, "nf4")
    record_adapter_facts(model, quailora=True)
    export_rank(model, 4, str(tmp_path / "r4"), rank_scaling="constant")
    card = card_of(tmp_path / "r4")
    assert "Do not attach it to, or merge it into, the full-precision base" in card
    assert "34.2" in card and "30.3" in card and "hf-quailora export --merged --rank 4" in card


def test_the_trainers_save_adds_the_card_section_and_keeps_trls_card(tiny_model_path, tiny_texts, tmp_path):
    from testing_utils import make_trainer

    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path / "run")
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# trl's card\n")
    trainer.save_model()
    card = card_of(tmp_path / "run")
    assert "# trl's card" in card and "## Deployment (hf_quailora)" in card and "library_name: peft" in card
    trainer.save_model(str(tmp_path / "elsewhere"))
    assert card_of(tmp_path / "elsewhere").count("## Deployment (hf_quailora)") == 1


def test_a_quailora_adapter_on_another_base_is_refused_before_loading_unless_allowed(tiny_model_path, tmp_path):
    folder = save_adapter(tiny_model_path, tmp_path / "adapter", quantization="nf4", quailora=True)
    with pytest.raises(ValueError, match="QuAILoRA adapter trained on a 'nf4' base.*allow_other_base=True"):
        load_dynamic_rank_adapter(MISSING_BASE, folder, quantization="none")
    loaded = load_dynamic_rank_adapter(tiny_model_path, folder, quantization="none", allow_other_base=True)
    assert loaded.metadata.quailora
    plain = save_adapter(tiny_model_path, tmp_path / "plain", quantization="nf4")  # not QuAILoRA: a warning only
    load_dynamic_rank_adapter(tiny_model_path, plain, quantization="none")


@require_bitsandbytes
def test_a_given_full_precision_base_is_used_for_a_quailora_adapter_only_when_allowed(tiny_model_path, tmp_path):
    folder = save_adapter(tiny_model_path, tmp_path / "adapter", quantization="nf4", quailora=True)
    with pytest.raises(ValueError, match="quantized as 'none'.*allow_other_base=True"):
        load_dynamic_rank_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_path), folder)
    full_precision = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert load_dynamic_rank_adapter(full_precision, folder, allow_other_base=True).metadata.quailora


def test_the_cli_refuses_a_quailora_adapter_on_another_base_unless_allowed(tiny_model_path, tmp_path):
    from hf_quailora.cli import main as cli_main

    folder = save_adapter(tiny_model_path, tmp_path / "adapter", quantization="nf4", quailora=True)
    args = ["export", "--model", MISSING_BASE, "--adapter", folder, "--rank", "2", "--quantization", "none"]
    for extra in ([], ["--merged"]):
        with pytest.raises(ValueError, match="QuAILoRA adapter trained on a 'nf4' base"):
            cli_main([*args, *extra, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="does not exist|not embedded|not a folder"):  # past the check: the base
        cli_main([*args, "--allow_other_base", "--output_dir", str(tmp_path / "out")])
