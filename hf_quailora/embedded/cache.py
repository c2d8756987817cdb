"""hf_quailora's cache folder, and the one way things are written into it: once, under a lock, atomically.

Converted models, the embedded data and the offline lm-eval tasks all live under `$HF_QUAILORA_CACHE` (default
`~/.cache/hf_quailora`). Several processes may start at once (`torchrun`, `accelerate launch`, parallel tests):
`build_once` lets one of them build into a temporary folder under a file lock and rename it into place, while the
others wait and reuse it; a folder half-written by a killed run is never taken for a finished one.

Example:

```python
from hf_quailora.embedded.cache import build_once, get_cache_dir

folder = build_once(get_cache_dir() / "things", lambda tmp: (tmp / "a.txt").write_text("hello"))
```
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


CACHE_ENV_VAR = "HF_QUAILORA_CACHE"
_DONE_MARKER = ".complete"


def get_cache_dir() -> Path:
    """Return the root cache folder of hf_quailora (`$HF_QUAILORA_CACHE`, else `~/.cache/hf_quailora`)."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hf_quailora"


def build_once(target: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Make sure the folder `target` exists and is complete, building it with `build(tmp_folder)` if not.

    `build` fills a fresh temporary folder beside `target`; it is then renamed into place (atomic on one file
    system) with a completion marker. Concurrent callers serialise on a file lock beside `target`.

    Args:
        target (`str` or `os.PathLike`): the folder to build.
        build (`Callable[[Path], None]`): fills the folder it is given.

    Returns:
        `Path`: `target`.
    """
    from filelock import FileLock

    target = Path(target)
    if (target / _DONE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / _DONE_MARKER).is_file():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / _DONE_MARKER).touch()
            if target.exists():  # a half-written folder from a killed run, or one from before the marker
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
