"""Writing adapters and result files so that an interrupted write never leaves something that looks finished.

- `staged_folder(target)`: fill a temporary folder beside `target`, then publish it. A new `target` appears by one
  rename; an existing one is updated file by file (each an atomic rename), with its `adapter_config.json` removed
  first and put back last, so at no moment does it hold a loadable adapter made of old and new files.
- `write_file_atomically(path, write)`: a temporary file beside `path`, then one rename.

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
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


ADAPTER_CONFIG = "adapter_config.json"  # peft's marker of a saved adapter: written last, removed first


def check_not_a_file(path: str | os.PathLike, name: str = "output_dir") -> None:
    """Raise a `ValueError` when `path` exists but is a file, not a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{name}` ({path}) is an existing file, not a folder; choose a folder path.")


def _temporary_name(path: Path) -> Path:
    # Not tempfile.mkdtemp/mkstemp: their 0700/0600 modes would stay on what is published.
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _publish(tmp: Path, target: Path, last: str) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    (target / last).unlink(missing_ok=True)  # from here on, target does not load as an adapter
    for entry in sorted(tmp.iterdir()):
        if entry.name == last:
            continue
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    if (tmp / last).exists():
        os.replace(tmp / last, target / last)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, last: str = ADAPTER_CONFIG) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success publish its contents into `target`.

    Files already in `target` that the new contents do not replace are kept (a run's checkpoints, other results).
    On an exception nothing is published and the temporary folder is removed.

    Args:
        target (`str` or `os.PathLike`): the folder to create or update.
        last (`str`, defaults to `"adapter_config.json"`): the file published last (and removed first when it
            is replaced), so that a reader never sees it beside half of the other files.
    """
    target = Path(target)
    check_not_a_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target)
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, target, last)
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
