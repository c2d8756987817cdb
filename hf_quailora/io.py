"""Writing files and folders so that an interrupted write never leaves something that looks finished.

The public face of the package's own writers (the trainer's checkpoints, `export_rank`, the init reports and the
benchmarks all use them):

- `write_file_atomically(path, write)`: `write` fills a temporary file beside `path`, then one rename publishes it.
- `staged_folder(target)`: fill a temporary folder beside `target`, then publish it (an adapter's
  `adapter_config.json` last).
- `DiskFullError`: what both raise when the disk or a quota fills (an `OSError` with `errno` `ENOSPC`/`EDQUOT`,
  naming the path and about how many bytes it needs); nothing is published and the earlier version stays intact.

Example:

```python
import json

from hf_quailora.io import write_file_atomically


def write(temporary_path):
    with open(temporary_path, "w") as handle:
        json.dump({"perplexity": 31.6}, handle)


write_file_atomically("results.json", write)  # a reader sees the old file or the new one, never half of it
```
"""

from ._io_utils import DiskFullError, staged_folder, write_file_atomically


__all__ = ["DiskFullError", "staged_folder", "write_file_atomically"]
