"""The one home of dynamic rank's vocabulary: rank checks, `dynamic_rank.json`, and the default scaling."""

import json
import os
import warnings

import pytest
import torch

from hf_quailora import DynamicRankMetadata, QuAILoRAInitCallback, export_rank, quailora_init, use_rank
from hf_quailora._peft_utils import record_adapter_facts
from hf_quailora.dynamic_rank.spec import (
    METADATA_FILE,
    check_ranks,
    check_trained_ranks,
    default_eval_ranks,
    parse_ranks,
    resolve_rank_scaling,
)

from testing_utils import R, make_model, make_trainer, require_bitsandbytes


# Rank checks


def test_check_ranks_names_the_option_the_rank_and_the_range():
    check_ranks([1, 4, 8], 1, 8, "eval_ranks")
    with pytest.raises(ValueError, match=r"`eval_ranks` holds rank 12, outside this adapter's range 1\.\.8"):
        check_ranks([1, 12], 1, 8, "eval_ranks", "this adapter's range")
    with pytest.raises(TypeError, match="`ranks` must be an integer"):
        check_ranks([1, 2.5], 1, 8, "ranks")


def test_parse_ranks_and_default_eval_ranks():
    assert parse_ranks("4, 1,4,16") == [1, 4, 16]
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_ranks("1,two")
    assert default_eval_ranks(1, 16) == [1, 2, 4, 8, 16]
    assert default_eval_ranks(3, 12) == [3, 4, 8, 12]


# dynamic_rank.json


def test_metadata_round_trips_and_rejects_bad_values(tmp_path):
    metadata = DynamicRankMetadata(max_rank=16, min_rank=2, rank_scaling="constant", quantization="nf4", quailora=True)
    metadata.save(tmp_path)
    assert DynamicRankMetadata.load(tmp_path) == metadata
    assert DynamicRankMetadata.load(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="rank_scaling"):
        DynamicRankMetadata(max_rank=4, rank_scaling="alpha")
    with pytest.raises(ValueError, match="min_rank"):
        DynamicRankMetadata(max_rank=4, min_rank=5)
    with pytest.raises(ValueError, match="quantization"):
        DynamicRankMetadata(max_rank=4, quantization="nf8")
    with pytest.raises(TypeError, match="quailora"):
        DynamicRankMetadata(max_rank=4, quailora="yes")
    with pytest.raises(ValueError, match="exported_rank"):
        DynamicRankMetadata(max_rank=4, exported_rank=2)


def test_metadata_reads_the_layout_of_old_exports_with_the_quantization_unknown(tmp_path):
    (tmp_path / METADATA_FILE).write_text(json.dumps({"rank": 4, "rank_scaling": "per_rank", "max_rank": 16}))
    metadata = DynamicRankMetadata.load(tmp_path)
    assert (metadata.exported_rank, metadata.max_rank, metadata.rank_scaling) == (4, 4, "per_rank")
    assert metadata.quantization is None  # the loaders refuse to guess it (tests/dynamic_rank/test_export.py)


@require_bitsandbytes
def test_save_model_and_export_write_one_metadata_layout_with_the_base_quantization(tiny_model_path, tiny_texts,
                                                                                    tmp_path):
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, quantization="nf4", max_rank=4, min_rank=2,
                           update_rule="nested", rank_scaling="constant")
    trainer.save_model(str(tmp_path / "adapter"))
    export_rank(trainer.model, 3, str(tmp_path / "r3"))
    saved = json.loads((tmp_path / "adapter" / METADATA_FILE).read_text())
    exported = json.loads((tmp_path / "r3" / METADATA_FILE).read_text())
    assert set(saved) == set(exported) == set(DynamicRankMetadata.__dataclass_fields__)
    assert saved == {**exported, "max_rank": 4, "exported_rank": None}
    assert (saved["quantization"], saved["min_rank"], saved["update_rule"], saved["rank_scaling"]) == (
        "nf4", 2, "nested", "constant")
    assert [name for name in os.listdir(tmp_path) if ".tmp-" in name] == []  # written via a temporary folder


def test_metadata_cannot_be_saved_without_the_base_quantization(tmp_path):
    with pytest.raises(ValueError, match="Set `quantization`"):
        DynamicRankMetadata(max_rank=4).save(tmp_path)
    assert not (tmp_path / METADATA_FILE).exists()


def test_check_trained_ranks_names_the_trained_max_rank():
    check_trained_ranks([1, 4], lora_rank=8, max_rank=4, name="ranks")
    with pytest.raises(ValueError, match="`ranks` holds rank 8, above this adapter's max_rank 4: .* 1..4"):
        check_trained_ranks([1, 8], lora_rank=8, max_rank=4, name="ranks")
    with pytest.raises(ValueError, match="outside this adapter's range 1..4"):
        check_trained_ranks([0], lora_rank=8, max_rank=4, name="ranks")
    with pytest.raises(ValueError, match="outside this adapter's range 1..8"):
        check_trained_ranks([9], lora_rank=8, max_rank=None, name="ranks")


# The default scaling: the recorded one, else constant after QuAILoRA (with a FutureWarning), else α/b


def test_rank_scaling_defaults_to_the_recorded_one_else_per_rank(tiny_model_path):
    model, _ = make_model(tiny_model_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_rank_scaling(model, None) == "per_rank"
        record_adapter_facts(model, rank_scaling="rslora")
        assert resolve_rank_scaling(model, None) == "rslora"
        assert resolve_rank_scaling(model, "constant") == "constant"
    with pytest.raises(ValueError, match="rank_scaling"):
        resolve_rank_scaling(model, "alpha")


@require_bitsandbytes
def test_a_quailora_adapter_defaults_to_constant_scaling_and_says_so(tiny_model_path, tiny_texts):
    model, tokenizer = make_model(tiny_model_path, "nf4")
    quailora_init(model, tiny_texts, tokenizer=tokenizer)
    ids = tokenizer(tiny_texts[:2], return_tensors="pt", padding=True)["input_ids"]
    model.eval()
    with torch.no_grad():
        with use_rank(model, 2, rank_scaling="constant"):
            expected = model(ids).logits
        with pytest.warns(FutureWarning, match="defaults to 'constant'"):
            with use_rank(model, 2):
                torch.testing.assert_close(model(ids).logits, expected)


def test_a_trainer_asks_the_same_resolver_with_its_callbacks(tiny_model_path):
    model, _ = make_model(tiny_model_path)
    callback = QuAILoRAInitCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_rank_scaling(model, None, callbacks=[]) == "per_rank"
        assert resolve_rank_scaling(model, None, callbacks=[object(), callback]) == "constant"  # QuAILoRA to come
        assert resolve_rank_scaling(model, "rslora", callbacks=[callback]) == "rslora"
        record_adapter_facts(model, quailora=True)
        assert resolve_rank_scaling(model, None, callbacks=[]) == "constant"  # a trainer logs it, no warning
    with pytest.warns(FutureWarning, match="defaults to 'constant'"):
        assert resolve_rank_scaling(model, None) == "constant"
    record_adapter_facts(model, rank_scaling="per_rank")  # recorded by an earlier trainer or the loader
    assert resolve_rank_scaling(model, None, callbacks=[]) == "per_rank"
    assert resolve_rank_scaling(model, None, callbacks=[callback]) == "constant"  # QuAILoRA initialises it again


@require_bitsandbytes
def test_the_trainer_warns_when_quailora_starts_at_another_scaling(tiny_model_path, tiny_texts, tmp_path, caplog):
    callback = QuAILoRAInitCallback(calibration_dataset=tiny_texts, num_samples=4, max_length=32)
    trainer = make_trainer(tiny_model_path, tiny_texts, tmp_path, quantization="nf4", callbacks=[callback],
                           rank_scaling="per_rank", max_steps=1)
    with caplog.at_level("WARNING", logger="hf_quailora"):
        trainer.train()
    assert "QuAILoRA solves for the adapter's scaling" in caplog.text and "rank_scaling='per_rank'" in caplog.text
    assert callback.report is not None


# Renamed argument and changed default of use_rank


def test_the_old_scaling_argument_still_works_with_a_deprecation_warning(tiny_model_path, tmp_path):
    model, tokenizer = make_model(tiny_model_path)
    ids = torch.tensor([[1, 5, 7, 9]])
    model.eval()
    with torch.no_grad():
        with use_rank(model, 2, rank_scaling="constant"):
            expected = model(ids).logits
        with pytest.warns(FutureWarning, match="`scaling=` is deprecated"):
            with use_rank(model, 2, scaling="constant"):
                torch.testing.assert_close(model(ids).logits, expected)
    with pytest.warns(FutureWarning, match="`scaling=` is deprecated"):
        export_rank(model, 2, str(tmp_path / "r2"), scaling="constant")
    assert DynamicRankMetadata.load(tmp_path / "r2").rank_scaling == "constant"
    with pytest.raises(ValueError, match="pass only `rank_scaling`"), pytest.warns(FutureWarning):
        with use_rank(model, 2, rank_scaling="per_rank", scaling="constant"):
            pass


def test_use_rank_warns_about_its_new_update_rule_default_only_when_gradients_flow(tiny_model_path):
    model, _ = make_model(tiny_model_path)
    ids = torch.tensor([[1, 5, 7, 9]])
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), use_rank(model, 2, rank_scaling="per_rank"):
            model(ids)
    model.train()
    with pytest.warns(FutureWarning, match="update_rule='frozen'"):
        with use_rank(model, R // 2, rank_scaling="per_rank"):
            model(ids).logits.sum().backward()
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    grad = layer.lora_A["default"].weight.grad
    assert grad[: R // 2 - 1].abs().sum() == 0 and grad[R // 2 - 1].abs().sum() > 0  # frozen: only component b
