"""Writing adapters and result files so that an interrupted write never leaves something that looks finished.

- `staged_folder(target)`: fill a temporary folder beside `target`, then publish it. A new `target` appears by one
  rename; an existing one is updated file by file (each an atomic rename), with its `adapter_config.json` removed
  first and put back last, so at no moment does it hold a loadable adapter made of old and new files.
- `write_file_atomically(path, write)`: a temporary file beside `path`, then one rename.

A write that runs out of disk space (`ENOSPC`, or `EDQUOT` over a quota) raises `DiskFullError`, an `OSError`
with that errno, naming the path and about how many bytes it needs; nothing is published and the temporary file or
folder is removed, so the previous version stays as it was.

The cache has its own variant with a lock and a completion marker (`embedded.cache.build_once`).

Example:

```python
with staged_folder("outputs/adapter-r4") as tmp:
    config.save_pretrained(tmp)
    save_file(state, tmp / "adapter_model.safetensors")
```
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


ADAPTER_CONFIG = "adapter_config.json"  # peft's marker of a saved adapter: written last, removed first
_DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}
_NEARLY_FULL_BYTES = 1 << 20  # free space below which a write error without an errno counts as a full disk


class DiskFullError(OSError):
    """A write ran out of space: `errno` is `ENOSPC` (disk full) or `EDQUOT` (quota exceeded).

    Attributes:
        path (`str`): the file or folder being written.
        needed_bytes (`int`): about how many bytes the write needs (a lower bound: what it had written when the disk
            filled, or the size of the version it replaces when that is larger).
        free_bytes (`int`): the free space left on that file system.

    Example:

    ```python
    try:
        trainer.train()
    except DiskFullError as error:
        print(error.path, error.needed_bytes, error.free_bytes)
    ```
    """

    def __init__(self, code: int, path: str | os.PathLike, needed_bytes: int, written_bytes: int, free_bytes: int):
        replaced = needed_bytes - written_bytes
        detail = f"{written_bytes} written before the write failed" + (
            f"; its earlier version holds {needed_bytes}" if replaced > 0 else "")
        super().__init__(code, f"{_DISK_FULL.get(code, os.strerror(code))} writing {path}: it needs about "
                               f"{needed_bytes} bytes ({detail}) and {free_bytes} bytes are free there; free space or "
                               "choose another output_dir.")
        self.path, self.needed_bytes, self.free_bytes = str(path), needed_bytes, free_bytes


def tree_bytes(path: str | os.PathLike, recursive: bool = True) -> int:
    """The size in bytes of a file, or of the files in a folder (its subfolders too when `recursive`); 0 if absent."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    entries = path.rglob("*") if recursive else path.iterdir()
    return sum(entry.stat().st_size for entry in entries if entry.is_file() and not entry.is_symlink())


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def disk_full_errno(error: BaseException, folder: str | os.PathLike) -> int | None:
    """`ENOSPC`/`EDQUOT` when `error` (or an error it was raised from) says the disk or quota is full, else `None`.

    Writers report it differently: `OSError` with the errno, safetensors' `SafetensorError` in words ("No space left
    on device (os error 28)"), `torch.save` only as "unexpected pos" / "file write failed"; the last counts as a full
    disk when the file system of `folder` has under 1 MiB left.
    """
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return current.errno
        for code, text in _DISK_FULL.items():
            if text.lower() in str(current).lower():
                return code
        current = current.__cause__ or current.__context__
    if isinstance(error, (OSError, RuntimeError)) and 0 <= _free_bytes(Path(folder)) < _NEARLY_FULL_BYTES:
        return errno.ENOSPC
    return None


def raise_if_disk_full(error: BaseException, target: str | os.PathLike, sizes: Callable[[], tuple[int, int]]) -> None:
    """Raise `DiskFullError` from `error` when it reports a full disk or quota while writing `target`; `sizes()`
    gives (bytes written, bytes of the earlier version), measured only then. A `DiskFullError` of a write inside
    `target` is raised again for `target`, with the larger estimate."""
    target = Path(target)
    code = disk_full_errno(error, target.parent)
    if code is None:
        return
    written, replaced = sizes()
    if isinstance(error, DiskFullError):
        written, replaced = max(written, error.needed_bytes), max(replaced, error.needed_bytes)
        error = error.__cause__ or error
    raise DiskFullError(code, target, max(written, replaced), written, _free_bytes(target.parent)) from error


def check_not_a_file(path: str | os.PathLike, name: str = "output_dir") -> None:
    """Raise a `ValueError` when `path` exists but is a file, not a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{name}` ({path}) is an existing file, not a folder; choose a folder path.")


def _temporary_name(path: Path) -> Path:
    # Not tempfile.mkdtemp/mkstemp: their 0700/0600 modes would stay on what is published.
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _publish(tmp: Path, target: Path, last: str) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    # File by file; what is replaced moves to a backup folder first, so that a failure puts the old version back.
    backup, replaced, published = _temporary_name(target), [], []
    backup.mkdir()
    try:
        names = [entry.name for entry in sorted(tmp.iterdir()) if entry.name != last]
        for name in [last, *names]:
            if (target / name).exists() or (target / name).is_symlink():
                os.replace(target / name, backup / name)  # `last` first: from here on, target does not load
                replaced.append(name)
            if name != last:
                os.replace(tmp / name, target / name)
                published.append(name)
        if (tmp / last).exists():
            os.replace(tmp / last, target / last)
    except BaseException:
        for name in published:
            _remove(target / name)
        for name in replaced:
            os.replace(backup / name, target / name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, last: str = ADAPTER_CONFIG) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success publish its contents into `target`.

    Files already in `target` that the new contents do not replace are kept (a run's checkpoints, other results).
    On an exception nothing is published and the temporary folder is removed; a full disk or quota raises
    `DiskFullError`. When `target` exists, a failure while publishing puts its replaced files back.

    Args:
        target (`str` or `os.PathLike`): the folder to create or update.
        last (`str`, defaults to `"adapter_config.json"`): the file published last (and removed first when it
            is replaced), so that a reader never sees it beside half of the other files.

    Raises:
        DiskFullError: the disk or quota filled while writing (`errno` `ENOSPC` or `EDQUOT`).
    """
    target = Path(target)
    check_not_a_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target)
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, target, last)
    except Exception as error:
        raise_if_disk_full(error, target, lambda: (tree_bytes(tmp), tree_bytes(target, recursive=False)))
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> str:
    """Call `write(temporary_path)`, then rename the temporary file to `path` (one atomic step); return `path`.

    A reader of `path` sees the old file or the new one, never a part of the new one. On an exception in `write`
    nothing is published and the temporary file is removed. Public as `hf_quailora.write_file_atomically`.

    Args:
        path (`str` or `os.PathLike`): the file to create or replace; its folder must exist.
        write (`Callable[[str], object]`): writes the whole file to the path it is given, a hidden file beside
            `path` with the same suffix (so that writers which pick the format from it, such as matplotlib's
            `savefig`, still do).

    Returns:
        `str`: `path`.

    Raises:
        DiskFullError: the disk or quota filled while writing (`errno` `ENOSPC` or `EDQUOT`); `path` is unchanged.

    Example:

    ```python
    >>> from pathlib import Path
    >>> from hf_quailora import write_file_atomically
    >>> write_file_atomically("notes.txt", lambda tmp: Path(tmp).write_text("done"))
    'notes.txt'
    ```
    """
    path = Path(path)
    tmp = str(_temporary_name(path)) + path.suffix  # keep the suffix: writers may pick the format from it
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as error:
        raise_if_disk_full(error, path, lambda: (tree_bytes(tmp), tree_bytes(path)))
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(path)


def read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in `path`; a `ValueError` naming the file and ending with `fix` when it is not one."""
    try:
        payload = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}). {fix}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} must hold a JSON object; it holds a {type(payload).__name__}. {fix}")
    return payload
