"""The embedded defaults: the cache is written once, under a lock, atomically; the one Alpaca hold-out; names of
data and models that do not exist get a sentence, not a Hub traceback."""

import multiprocessing
import time

import pytest

from hf_quailora.embedded.cache import build_once
from hf_quailora.embedded.data import ALPACA_HOLDOUT, load_dataset_any, split_holdout
from hf_quailora.quantization import load_quantized_model


def _slow_build(folder):
    time.sleep(0.5)  # long enough for the other process to arrive while this one holds the lock
    (folder / "built_by").write_text(multiprocessing.current_process().name)


def _build_in_process(target):
    build_once(target, _slow_build)


def test_build_once_builds_a_single_time_across_processes(tmp_path):
    target = tmp_path / "thing"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_build_in_process, args=(target,), name=f"p{i}") for i in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert (target / "built_by").read_text() in ("p0", "p1")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".thing-")] == []  # no temporary folder left
    calls = []
    build_once(target, lambda folder: calls.append(folder))
    assert calls == []  # complete: not built again


def test_build_once_replaces_a_half_written_folder_and_keeps_nothing_of_a_failed_build(tmp_path):
    target = tmp_path / "thing"
    target.mkdir()
    (target / "partial").write_text("from a killed run")
    with pytest.raises(RuntimeError, match="boom"):
        build_once(target, lambda folder: (_ for _ in ()).throw(RuntimeError("boom")))
    assert (target / "partial").is_file()  # a failed build leaves the old folder as it was
    build_once(target, lambda folder: (folder / "whole").write_text("ok"))
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == ["whole"]


def test_split_holdout_is_the_one_alpaca_hold_out():
    examples = list(range(999))
    train, held_out = split_holdout(examples)
    assert len(held_out) == ALPACA_HOLDOUT and held_out[0] == len(examples) - ALPACA_HOLDOUT
    assert train + held_out == examples
    for bad in (0, 999, 5000, 2.5):
        with pytest.raises(ValueError, match="hold-out"):
            split_holdout(examples, bad)


def test_an_unknown_dataset_name_offline_says_it_is_neither_embedded_nor_a_file():
    with pytest.raises(ValueError, match=r"'alpacca' is neither an embedded dataset \(alpaca, wiki, c4\) nor an "
                                         r"existing file.*Hub is offline"):
        load_dataset_any("alpacca")  # tests run with HF_HUB_OFFLINE=1


def test_a_missing_data_file_is_named_as_a_file(tmp_path):
    with pytest.raises(ValueError, match="nor an existing file"):
        load_dataset_any(str(tmp_path / "train.json"))


def test_an_empty_data_file_is_refused_naming_it(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="Could not read .*empty.json as a dataset"):
        load_dataset_any(str(tmp_path / "empty.json"))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no examples"):
        load_dataset_any(str(tmp_path / "blank.txt"))


def test_a_hold_out_of_data_too_small_to_split_says_so():
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout([1], 1)


def test_an_unknown_model_name_offline_or_a_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="Model folder .* does not exist"):
        load_quantized_model(str(tmp_path / "no-model"), "none")
    with pytest.raises(ValueError, match="'nobody/no-such-model' is neither an embedded model .* Hub is offline"):
        load_quantized_model("nobody/no-such-model", "none")


def test_a_split_gguf_is_joined_in_order_and_checked_against_its_sha256(tmp_path):
    import hashlib

    from hf_quailora.embedded.models import EmbeddedModel, _find_gguf, _join_parts

    parts = []
    for index, content in enumerate((b"GGUF-head-", b"middle-", b"tail")):
        parts.append(tmp_path / f"model.gguf.part{index:02d}")
        parts[-1].write_bytes(content)
    whole = b"GGUF-head-middle-tail"
    spec = EmbeddedModel("split", "nowhere_part1", "model.gguf", "pip install split-model", "a split model",
                         parts=("nowhere_part1", "nowhere_part2"), sha256=hashlib.sha256(whole).hexdigest())
    (tmp_path / "out").mkdir()
    assert _join_parts(spec, parts, tmp_path / "out").read_bytes() == whole
    wrong = EmbeddedModel(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match=r"has sha256 .*reinstall with `pip install split-model`"):
        _join_parts(wrong, parts, tmp_path / "out")
    with pytest.raises(ImportError, match=r"needs the package `nowhere_part1`.*pip install split-model"):
        _find_gguf(spec)  # a missing part package is named with the install command, before anything is converted
