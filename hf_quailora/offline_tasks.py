"""lm-evaluation-harness task definitions that run offline on the embedded data.

| task                     | output type               | data                                   | metrics                          |
|--------------------------|---------------------------|----------------------------------------|----------------------------------|
| `quailora_wiki_ppl`      | `loglikelihood_rolling`   | the embedded Wikipedia text, in chunks | word/byte perplexity, bits/byte  |
| `quailora_alpaca_loss`   | `loglikelihood`           | Alpaca responses given their prompts   | word perplexity, bits/byte       |
| `quailora_alpaca_mc`     | `multiple_choice`         | the right Alpaca response among 4      | acc, acc_norm                    |

`write_offline_tasks()` writes the YAML files and their JSONL data into one folder and returns it; pass it to
`lm_eval.tasks.TaskManager(include_path=...)` (or `--include_path` of lm-eval's command line).

Example:

```python
from lm_eval.tasks import TaskManager
from hf_quailora.offline_tasks import write_offline_tasks

task_manager = TaskManager(include_path=write_offline_tasks())
```
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from .data import ALPACA_PROMPT, ensure_embedded_data, format_alpaca
from .models import get_cache_dir


OFFLINE_TASKS = ("quailora_wiki_ppl", "quailora_alpaca_loss", "quailora_alpaca_mc")
_WORDS_PER_CHUNK = 192
_HELD_OUT_ALPACA = 200  # the last examples of the embedded Alpaca file; recipes train on the others

# lm-eval's per-document "perplexity" of a loglikelihood task is exp(−log p(whole response)), which overflows for
# responses of a few hundred tokens; score responses per word and per byte instead, like wikitext.
_UTILS = '''"""Helpers of the hf_quailora offline lm-eval tasks (written by hf_quailora.offline_tasks)."""


def process_response_loss(doc, results):
    loglikelihood, _ = results[0]
    text = doc["completion"]
    return {
        "word_perplexity": (loglikelihood, max(1, len(text.split()))),
        "bits_per_byte": (loglikelihood, max(1, len(text.encode("utf-8")))),
    }
'''

_TEMPLATES = {
    "quailora_wiki_ppl": """task: quailora_wiki_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
    "quailora_alpaca_loss": """task: quailora_alpaca_loss
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
target_delimiter: ""
process_results: !function quailora_task_utils.process_response_loss
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
""",
    "quailora_alpaca_mc": """task: quailora_alpaca_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
""",
}


def _wiki_chunks(text_file: Path) -> list[dict]:
    chunks = []
    for line in text_file.read_text(encoding="utf-8").splitlines():
        words = line.split()
        for start in range(0, len(words), _WORDS_PER_CHUNK):
            piece = words[start : start + _WORDS_PER_CHUNK]
            if len(piece) >= _WORDS_PER_CHUNK // 2:
                chunks.append({"text": " ".join(piece)})
    return chunks


def write_offline_tasks(folder: str | os.PathLike | None = None) -> str:
    """Write the offline task YAMLs and their data; return the folder (an lm-eval `include_path`).

    The Alpaca tasks use the last 200 examples of the embedded Alpaca file (held out from the recipes' training
    split); the multiple-choice task pairs each prompt with its own response and 3 responses of other examples
    (deterministic shuffle).
    """
    folder = Path(folder) if folder is not None else get_cache_dir() / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_embedded_data()
    alpaca = json.loads((data_dir / "alpaca_en_demo.json").read_text(encoding="utf-8"))[-_HELD_OUT_ALPACA:]
    pairs = [format_alpaca(example) for example in alpaca]
    rng = random.Random(0)
    mc = []
    for index, pair in enumerate(pairs):
        others = rng.sample([p["completion"] for i, p in enumerate(pairs) if i != index], 3)
        label = rng.randrange(4)
        choices = others[:label] + [pair["completion"]] + others[label:]
        mc.append({"prompt": pair["prompt"], "choices": choices, "label": label})
    datasets = {
        "quailora_wiki_ppl": _wiki_chunks(data_dir / "wiki_demo.txt"),
        "quailora_alpaca_loss": pairs,
        "quailora_alpaca_mc": mc,
    }
    (folder / "quailora_task_utils.py").write_text(_UTILS)
    for task, rows in datasets.items():
        data_file = folder / f"{task}.jsonl"
        with open(data_file, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        (folder / f"{task}.yaml").write_text(_TEMPLATES[task].format(data=json.dumps(str(data_file))))
    return str(folder)


__all__ = ["ALPACA_PROMPT", "OFFLINE_TASKS", "write_offline_tasks"]
