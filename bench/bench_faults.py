"""Kill a QuAILoRA-initialised DynamicRankTrainer run with SIGKILL at seeded random moments, resume, and count what
survives (issue 35; the harness is tests/fault_harness.py, its suite share tests/test_faults_kill.py).

Each trial kills one attempt, resumes (from the last checkpoint, or from the start when there is none) and may kill
that one too, then lets the last attempt finish. Kills are spread evenly over the moments: a training step, a
checkpoint, `save_model`, `export_rank`, the QuAILoRA init, the lm-eval sweep; the tick (file operation or module
forward) inside the moment is drawn uniformly. After every kill: do all folders on disk load completely, is the last
finished checkpoint still there; after the trial: are the final adapter, the rank-2 export and the rank sequence those
of the uninterrupted run, bit for bit (CPU, 1 thread), and was the init not recomputed on resume.

    python bench/bench_faults.py --kills 60 --seed 0

Writes bench/results/faults.md and faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def tiny_model(folder: str) -> str:
    """The tests' tiny Llama (2 blocks, hidden 64) and tokenizer, saved into `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def table(rows: dict, command: str, seconds: float) -> str:
    lines = ["| Moment killed | Kills | Survived | Unloadable folders | Lost checkpoints | Init recomputed |",
             "|---|---:|---:|---:|---:|---:|"]
    total = Counter()
    for moment, row in rows.items():
        lines.append(f"| {moment} | {row['kills']} | {row['survived']} | {row['unloadable']} | {row['lost']} | "
                     f"{row['init_recomputed']} |")
        total.update(row)
    lines.append(f"| **all** | {total['kills']} | {total['survived']} | {total['unloadable']} | {total['lost']} | "
                 f"{total['init_recomputed']} |")
    return "\n".join(lines) + f"\n\nCommand: `{command}` ({seconds:.0f} s, 1 torch thread, CPU).\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=60, help="stop once this many kills have landed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=os.path.join(HERE, "results", "faults"))
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval.evaluator  # noqa: F401 (imported once here: every attempt is a fork of this process)
    import torch
    from fault_harness import MOMENTS, Harness

    import hf_quailora  # noqa: F401

    torch.set_num_threads(1)
    start, rng = time.time(), random.Random(options.seed)
    rows = {moment: Counter(kills=0, survived=0, unloadable=0, lost=0, init_recomputed=0) for moment in MOMENTS}
    trials, queue = [], []
    with tempfile.TemporaryDirectory() as work:
        harness = Harness(tiny_model(os.path.join(work, "model")), work)
        harness.reference()
        while sum(row["kills"] for row in rows.values()) < options.kills:
            if len(queue) < 2:
                queue += rng.sample(MOMENTS, len(MOMENTS))  # every moment equally often
            plans = [harness.draw_plan(rng, queue.pop(0)) for _ in range(rng.choice((1, 2)))]
            outcome = harness.trial(plans, f"trial-{len(trials)}")
            good_end = outcome["finished"] and outcome["equal"] and outcome["same_ranks"]
            for kill in outcome["kills"]:
                row = rows[kill["moment"]]
                row.update(kills=1, unloadable=len(kill["unloadable"]), lost=len(kill["lost"]),
                           init_recomputed=outcome["init_recomputed"])
                row.update(survived=int(good_end and not kill["unloadable"] and not kill["lost"]
                                        and not outcome["init_recomputed"]))
            trials.append({"plans": plans, **{k: v for k, v in outcome.items()}})
            print(f"trial {len(trials)}: {[k['moment'] for k in outcome['kills']]} equal={outcome['equal']} "
                  f"ranks={outcome['same_ranks']} problems={outcome['unloadable'] + outcome['lost']}", flush=True)
    command = "python bench/bench_faults.py " + " ".join(sys.argv[1:])
    text = table(rows, command, time.time() - start)
    print(text)
    os.makedirs(os.path.dirname(options.results), exist_ok=True)
    from hf_quailora import write_file_atomically

    write_file_atomically(options.results + ".md", lambda tmp: open(tmp, "w").write(text))
    payload = json.dumps({"rows": rows, "trials": trials}, indent=1, default=str)
    write_file_atomically(options.results + ".json", lambda tmp: open(tmp, "w").write(payload))


if __name__ == "__main__":
    main()
