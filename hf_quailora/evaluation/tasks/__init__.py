"""lm-evaluation-harness task definitions that run offline on the embedded data.

| task                     | output type               | data                                   | metrics                          |
|--------------------------|---------------------------|----------------------------------------|----------------------------------|
| `quailora_wiki_ppl`      | `loglikelihood_rolling`   | the embedded Wikipedia text, in chunks | word/byte perplexity, bits/byte  |
| `quailora_alpaca_loss`   | `loglikelihood`           | Alpaca responses given their prompts   | word perplexity, bits/byte       |
| `quailora_alpaca_mc`     | `multiple_choice`         | the right Alpaca response among 4      | acc, acc_norm                    |
| `quailora_wiki_cloze`    | `multiple_choice`         | a Wikipedia sentence's last word of 4  | acc, acc_norm (chance: 25%)      |

The task YAML files ship in this folder. `write_offline_tasks()` writes them, with their JSONL data, into one
folder of the cache (once, under a lock, renamed into place whole) and returns it; pass it to
`lm_eval.tasks.TaskManager(include_path=...)` (or `--include_path` of lm-eval's command line).

Example:

```python
from lm_eval.tasks import TaskManager
from hf_quailora.evaluation.tasks import write_offline_tasks

task_manager = TaskManager(include_path=write_offline_tasks())
```
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from ...embedded.cache import build_once, get_cache_dir
from ...embedded.data import ensure_embedded_data, format_alpaca, split_holdout


OFFLINE_TASKS = ("quailora_wiki_ppl", "quailora_alpaca_loss", "quailora_alpaca_mc", "quailora_wiki_cloze")
TASKS_DIR = Path(__file__).parent
UTILS_FILE = "quailora_task_utils.py"  # lm-eval's `!function` helpers, copied beside the YAML
_DATA_PLACEHOLDER = '"@DATA_FILE@"'
_WORDS_PER_CHUNK = 192
_CLOZE_CONTEXT_WORDS = 48  # words before the blank: the sentence and what precedes it in the article
_CLOZE_DOCUMENTS = 500  # spread evenly over the articles, so that `limit=` samples every article


def _wiki_chunks(text_file: Path) -> list[dict]:
    chunks = []
    for line in text_file.read_text(encoding="utf-8").splitlines():
        words = line.split()
        for start in range(0, len(words), _WORDS_PER_CHUNK):
            piece = words[start : start + _WORDS_PER_CHUNK]
            if len(piece) >= _WORDS_PER_CHUNK // 2:
                chunks.append({"text": " ".join(piece)})
    return chunks


def _cloze_word(sentence: str) -> str | None:
    """The sentence's last word when it is a plain word of at least 4 letters (a blank worth guessing), else None."""
    words = sentence.split()
    word = words[-1].rstrip(".") if len(words) >= 6 else ""
    return word if len(word) >= 4 and word.isalpha() else None


def _wiki_cloze(text_file: Path) -> list[dict]:
    """Last-word cloze on the Wikipedia articles: the preceding words as context, and the sentence's true last word
    among 4 choices, the other 3 being words of the context (a deterministic draw, so chance is 25%)."""
    candidates = []  # (context, word) for every sentence that ends on a guessable word
    for line in text_file.read_text(encoding="utf-8").splitlines():
        words_so_far: list[str] = []
        for sentence in line.replace("? ", ". ").replace("! ", ". ").split(". "):
            word = _cloze_word(sentence)
            if word is not None and len(words_so_far) >= _CLOZE_CONTEXT_WORDS // 2:
                context = words_so_far + sentence.split()[:-1]
                candidates.append((" ".join(context[-_CLOZE_CONTEXT_WORDS:]), word))
            words_so_far += (sentence + ".").split()
    rng = random.Random(0)
    step = max(1, len(candidates) // _CLOZE_DOCUMENTS)
    rows = []
    for context, word in candidates[::step]:
        # distractors from the context itself: on topic, so that the blank needs the sentence, not just the subject
        pool = sorted({w for w in (c.strip(".,;:()\"'") for c in context.split()) if len(w) >= 4 and w.isalpha()
                       and w.lower() != word.lower()})
        if len(pool) < 3 or len(rows) == _CLOZE_DOCUMENTS:
            continue
        others = rng.sample(pool, 3)
        label = rng.randrange(4)
        rows.append({"context": context, "choices": others[:label] + [word] + others[label:], "label": label})
    return rows


def _task_rows(data_dir: Path) -> dict[str, list[dict]]:
    """The documents of each task: Wikipedia chunks, and the held-out Alpaca examples (with 3 distractors each)."""
    _, held_out = split_holdout(json.loads((data_dir / "alpaca_en_demo.json").read_text(encoding="utf-8")))
    pairs = [format_alpaca(example) for example in held_out]
    rng = random.Random(0)
    mc = []
    for index, pair in enumerate(pairs):
        others = rng.sample([p["completion"] for i, p in enumerate(pairs) if i != index], 3)
        label = rng.randrange(4)
        choices = others[:label] + [pair["completion"]] + others[label:]
        mc.append({"prompt": pair["prompt"], "choices": choices, "label": label})
    return {"quailora_wiki_ppl": _wiki_chunks(data_dir / "wiki_demo.txt"), "quailora_alpaca_loss": pairs,
            "quailora_alpaca_mc": mc, "quailora_wiki_cloze": _wiki_cloze(data_dir / "wiki_demo.txt")}


def _fill(folder: Path, final: Path, data_dir: Path) -> None:
    """Write into `folder` the files that will live in `final` (the YAML names the data by its final path)."""
    shutil.copy(TASKS_DIR / UTILS_FILE, folder / UTILS_FILE)
    for task, rows in _task_rows(data_dir).items():
        with open(folder / f"{task}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        template = (TASKS_DIR / f"{task}.yaml").read_text(encoding="utf-8")
        data_file = json.dumps(str(final.resolve() / f"{task}.jsonl"))
        (folder / f"{task}.yaml").write_text(template.replace(_DATA_PLACEHOLDER, data_file))


def _version() -> str:
    """A digest of the shipped task files and of this module (which builds their data), so that a changed task is
    written anew instead of reusing a stale one."""
    digest = hashlib.sha256()
    for path in sorted([*TASKS_DIR.glob("*.yaml"), TASKS_DIR / UTILS_FILE, Path(__file__)]):  # and their builder
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def write_offline_tasks(folder: str | os.PathLike | None = None) -> str:
    """The folder of the offline task YAMLs and their data (an lm-eval `include_path`), written on first use.

    The Alpaca tasks use the held-out examples of the embedded Alpaca file (`split_holdout`, never trained on by
    the recipes); the multiple-choice task pairs each prompt with its own response and 3 responses of other
    examples (deterministic shuffle).

    Args:
        folder (`str`, *optional*): where to write; defaults to `$HF_QUAILORA_CACHE/lm_eval_tasks/<version>`.

    Returns:
        `str`: the folder.

    Example:

    ```python
    task_manager = TaskManager(include_path=write_offline_tasks())
    ```
    """
    target = Path(folder) if folder is not None else get_cache_dir() / "lm_eval_tasks" / _version()
    data_dir = ensure_embedded_data()
    return str(build_once(target, lambda tmp: _fill(tmp, target, data_dir)))


__all__ = ["OFFLINE_TASKS", "write_offline_tasks"]
