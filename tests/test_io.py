"""hf_quailora.io: the public atomic writers (the package's own, re-exported)."""

import os
from pathlib import Path

import pytest


def test_public_names_are_the_package_writers():
    import hf_quailora
    from hf_quailora import _io_utils, io

    assert hf_quailora.write_file_atomically is io.write_file_atomically is _io_utils.write_file_atomically
    assert io.staged_folder is _io_utils.staged_folder
    assert "write_file_atomically" in hf_quailora.__all__ and hf_quailora.__all__ == sorted(hf_quailora.__all__)


def test_write_file_atomically_replaces_the_file_in_one_step(tmp_path):
    from hf_quailora import write_file_atomically

    path = tmp_path / "results.json"
    seen = []

    def write(temporary):
        seen.append(temporary)
        assert not path.exists() or path.read_text() == "old"  # nothing published while writing
        Path(temporary).write_text("new")

    path.write_text("old")
    assert write_file_atomically(path, write) == str(path)
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]
    assert seen[0].endswith(".json") and Path(seen[0]).parent == tmp_path  # beside it, with its suffix


def test_write_file_atomically_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from hf_quailora import write_file_atomically

    path = tmp_path / "table.md"
    path.write_text("old")

    def fail(temporary):
        Path(temporary).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["table.md"]  # no temporary file left


def test_staged_folder_publishes_only_on_success(tmp_path):
    from hf_quailora.io import staged_folder

    with staged_folder(tmp_path / "adapter") as folder:
        (folder / "adapter_config.json").write_text("{}")
        (folder / "weights.bin").write_bytes(b"1")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "weights.bin"]
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "other") as folder:
            (folder / "weights.bin").write_bytes(b"1")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
