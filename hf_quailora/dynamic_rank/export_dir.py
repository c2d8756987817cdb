"""Where `export_rank` may write: a new or empty folder, or an earlier export; never the adapter being exported."""

from __future__ import annotations

import os

from .._io_utils import ADAPTER_CONFIG, check_not_a_file
from .spec import METADATA_FILE, DynamicRankMetadata


WEIGHTS_FILE = "adapter_model.safetensors"
EXPORT_FILES = (ADAPTER_CONFIG, WEIGHTS_FILE, METADATA_FILE)  # what export_rank writes


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _is_earlier_export(folder: str | os.PathLike) -> bool:
    try:
        metadata = DynamicRankMetadata.load(folder)
    except (TypeError, ValueError):
        return False
    return metadata is not None and metadata.exported_rank is not None


def check_export_dir(output_dir: str | os.PathLike, overwrite: bool = False,
                     source_dir: str | os.PathLike | None = None) -> None:
    """Raise unless `export_rank` may write into `output_dir`; nothing is read but file names and `dynamic_rank.json`.

    Allowed: a new or empty folder, a folder without adapter files, or an earlier export (replaced). A folder with
    another adapter (or files named like one) needs `overwrite=True`; the folder of the adapter being exported
    (`source_dir`) is always refused.

    Raises:
        ValueError: `output_dir` is a file, is `source_dir`, or holds an adapter that is not an earlier export.
    """
    check_not_a_file(output_dir)
    if not os.path.isdir(output_dir):
        return
    if source_dir is not None and _same_folder(output_dir, source_dir):
        raise ValueError(
            f"`output_dir` ({output_dir}) is the folder of the adapter being exported; writing there would replace "
            "the full adapter by one of its ranks. Choose another folder, e.g. a sibling `adapter-r<rank>`."
        )
    existing = [name for name in EXPORT_FILES if os.path.exists(os.path.join(output_dir, name))]
    if existing and not overwrite and not _is_earlier_export(output_dir):
        raise ValueError(
            f"`output_dir` ({output_dir}) already holds an adapter ({', '.join(existing)}) that is not an earlier "
            "export; exporting there would replace it. Choose another folder, or pass overwrite=True "
            "(`--overwrite`) to replace it."
        )


__all__ = ["EXPORT_FILES", "WEIGHTS_FILE", "check_export_dir"]
