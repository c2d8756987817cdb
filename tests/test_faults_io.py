"""A full disk in the write path: `DiskFullError` names the path and the bytes, the earlier version stays intact and
no temporary file or folder is left behind (ENOSPC simulated with monkeypatch; see docs/limits.md, "Faults")."""

import errno
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from hf_quailora import _io_utils, export_rank
from hf_quailora._io_utils import DiskFullError, staged_folder, write_file_atomically

from testing_utils import make_model, one_thread  # noqa: F401 (autouse fixture)


def leftovers(folder):
    return sorted(entry.name for entry in Path(folder).iterdir() if ".tmp-" in entry.name)


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_write_file_atomically_names_the_path_and_bytes_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old" * 100)

    def write(temporary):
        Path(temporary).write_bytes(b"x" * 1000)
        enospc()

    with pytest.raises(DiskFullError, match="No space left on device writing .*results.json: it needs about 1000 "
                                             "bytes") as caught:
        write_file_atomically(path, write)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert caught.value.path == str(path) and caught.value.needed_bytes == 1000
    assert path.read_text() == "old" * 100 and leftovers(tmp_path) == []


@pytest.mark.parametrize(("error", "code"), [
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), errno.EDQUOT),
])
def test_other_writers_reports_of_a_full_disk_are_recognised(tmp_path, error, code):
    def write(temporary):
        raise error

    with pytest.raises(DiskFullError) as caught:
        write_file_atomically(tmp_path / "a.bin", write)
    assert caught.value.errno == code and caught.value.__cause__ is error


def test_an_errorless_write_failure_counts_as_a_full_disk_only_when_the_disk_is_nearly_full(tmp_path, monkeypatch):
    def write(temporary):  # what torch.save raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(RuntimeError, match="unexpected pos") as caught:
        write_file_atomically(tmp_path / "a.pt", write)
    assert not isinstance(caught.value, DiskFullError)
    monkeypatch.setattr(_io_utils, "_free_bytes", lambda folder: 4096)
    with pytest.raises(DiskFullError, match="4096 bytes are free"):
        write_file_atomically(tmp_path / "a.pt", write)


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        write_file_atomically(tmp_path / "a.json", lambda temporary: {}["missing"])
    with pytest.raises(PermissionError):
        write_file_atomically(tmp_path / "a.json", lambda temporary: (_ for _ in ()).throw(PermissionError(13, "no")))


def test_staged_folder_publishes_nothing_when_the_disk_fills(tmp_path):
    target = tmp_path / "adapter"
    with pytest.raises(DiskFullError, match="adapter: it needs about 2048 bytes"):
        with staged_folder(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"x" * 2048)
            enospc()
    assert not target.exists() and leftovers(tmp_path) == []


def test_a_failed_publish_puts_the_earlier_adapter_back(tiny_model_path, tmp_path, monkeypatch):
    model, _ = make_model(tiny_model_path, r=4)
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    (target / "notes.txt").write_text("kept")
    before = {name: path.read_bytes() for name, path in ((p.name, p) for p in target.iterdir())}
    calls = []
    real_replace = os.replace

    def replace_then_fail(source, destination):
        calls.append(destination)
        if len(calls) == 4:  # config and weights moved aside, the new weights published: midway
            enospc()
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(DiskFullError, match="adapter"):
        with staged_folder(target) as tmp:
            model.save_pretrained(tmp)
            (tmp / "extra.txt").write_text("new")
    monkeypatch.undo()
    assert len(calls) > 4  # the failed one, then the rollback's
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert leftovers(tmp_path) == []
    base, _ = make_model(tiny_model_path, r=4, seed=1)
    PeftModel.from_pretrained(base.get_base_model(), target)  # loads


def test_export_rank_on_a_full_disk_keeps_the_earlier_export(tiny_model_path, tmp_path, monkeypatch):
    model, _ = make_model(tiny_model_path, r=4)
    out = tmp_path / "rank-2"
    export_rank(model, 2, str(out))
    before = (out / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(1.0)

    def save_half(state, path, metadata=None):
        Path(path).write_bytes(b"x" * 512)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", save_half)  # export_rank imports it when called
    with pytest.raises(DiskFullError, match="rank-2: it needs about"):
        export_rank(model, 2, str(out), overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() == before and leftovers(tmp_path) == []
    base, _ = make_model(tiny_model_path, r=4, seed=1)
    PeftModel.from_pretrained(base.get_base_model(), out)
