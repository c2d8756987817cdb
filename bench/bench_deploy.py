"""Deployment routes × adapters: held-out perplexity, files to serve, load time; and the merged export's peak memory.

    python bench/bench_deploy.py --trained_adapter outputs/alpaca/adapter --qlora_adapter outputs/qlora/adapter
    python bench/bench_deploy.py --quailora_rank 64 --threads 1

Adapters: the QuAILoRA start (built here: NF4 SmolLM2-135M, `quailora_init` at `--quailora_rank` on C4 windows),
plus any saved adapters given (`make demo`'s trained one, a plain QLoRA one). Routes, each at the adapter's largest
trained rank:
  1. NF4 base + adapter         `load_dynamic_rank_adapter` (what was trained and evaluated);
  2. fp32 base + adapter        the usual full-precision deployment (`allow_other_base=True`): for a QuAILoRA
                                adapter the correction is applied twice; shown for what it costs;
  3. merged into Q, bf16        `export_merged(..., dtype="bfloat16")`, loaded by `AutoModelForCausalLM` as served;
  4. merged into Q, fp32        the same in float32: equals route 1 to rounding.
Perplexity: the embedded Wikipedia text, `--windows` × `--window_length` tokens. Load time: wall seconds of the load
call in this process (files in the page cache). Files: what a server needs on disk (base checkpoint + adapter, or
the merged folder).

`--memory` runs the merged export of the QuAILoRA start in a fresh process, sampling its RSS every 5 ms, and compares
the growth during the export with one shard (`--shard_mb`) plus the largest layer in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch


if __package__:  # imported as `bench.<script>` or run with `python -m`
    from ._common import peft_model, write_results
else:  # run as `python bench/<script>.py`: bench/ itself is on sys.path
    from _common import peft_model, write_results


def _folder_mb(path: str, suffix: str = "") -> float:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path)
               for name in names if name.endswith(suffix)) / 2**20


def _timed(call):
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def build_quailora_start(model_path: str, tokenizer, texts: list[str], rank: int, folder: str) -> str:
    """The QuAILoRA start on the NF4 base, saved (with dynamic_rank.json and its card) by `export_rank`."""
    from hf_quailora import QuAILoRAConfig, export_rank, make_token_windows, quailora_init

    model = peft_model(model_path, "nf4", rank=rank)
    calibration = make_token_windows(tokenizer, texts, 256, 16)
    quailora_init(model, calibration, QuAILoRAConfig(show_progress=False))
    export_rank(model, rank, folder, rank_scaling="constant")
    return folder


def measure_adapter(model_path: str, folder: str, held_out, workdir: str, tag: str) -> list[dict]:
    """The four routes for one saved adapter."""
    from transformers import AutoModelForCausalLM

    from hf_quailora import compute_perplexity, export_merged, use_rank
    from hf_quailora.dynamic_rank.export import load_dynamic_rank_adapter

    base_mb = _folder_mb(model_path, ".safetensors")
    adapter_mb = _folder_mb(folder, ".safetensors")
    rows = []
    loaded, seconds = _timed(lambda: load_dynamic_rank_adapter(model_path, folder))
    b = loaded.max_rank
    with use_rank(loaded.model, b, update_rule="frozen"):
        rows.append(dict(route="NF4 base + adapter", rank=b, ppl=compute_perplexity(loaded.model, held_out),
                         files_mb=base_mb + adapter_mb, load_s=seconds))
    merged = {}
    for dtype in ("bfloat16", "float32"):
        merged[dtype] = os.path.join(workdir, f"merged-{tag}-{dtype}")
        _, merged[f"{dtype}_export_s"] = _timed(lambda: export_merged(
            loaded.model, b, merged[dtype], dtype=dtype, tokenizer=loaded.tokenizer, show_progress=False))
    loaded = None  # free the NF4 model before the next one loads
    other, seconds = _timed(lambda: load_dynamic_rank_adapter(model_path, folder, quantization="none",
                                                              allow_other_base=True))
    with use_rank(other.model, b, update_rule="frozen"):
        rows.append(dict(route="fp32 base + adapter (or merged into W)", rank=b,
                         ppl=compute_perplexity(other.model, held_out), files_mb=base_mb + adapter_mb,
                         load_s=seconds))
    other = None
    for dtype in ("bfloat16", "float32"):
        model, seconds = _timed(lambda: AutoModelForCausalLM.from_pretrained(merged[dtype], dtype="auto"))
        rows.append(dict(route=f"merged into Q, {dtype}", rank=b, ppl=compute_perplexity(model, held_out),
                         files_mb=_folder_mb(merged[dtype], ".safetensors"), load_s=seconds,
                         export_s=merged[f"{dtype}_export_s"]))
    return rows


def measure_baselines(model_path: str, held_out) -> list[dict]:
    from hf_quailora import compute_perplexity, load_quantized_model

    rows = []
    for quantization, label in (("none", "fp32 base alone"), ("nf4", "NF4 base alone")):
        (model, _), seconds = _timed(lambda: load_quantized_model(model_path, quantization))
        rows.append(dict(route=label, rank=None, ppl=compute_perplexity(model, held_out),
                         files_mb=_folder_mb(model_path, ".safetensors"), load_s=seconds))
    return rows


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def memory_case(model_path: str, folder: str, shard_mb: int, output: str) -> None:
    """In this (fresh) process: load NF4 + adapter, then export merged (bf16) while sampling RSS."""
    from hf_quailora import export_merged
    from hf_quailora.dynamic_rank.export import load_dynamic_rank_adapter

    loaded = load_dynamic_rank_adapter(model_path, folder)
    # The largest layer in elements: packed 4-bit parameters hold half their weights, so linear layers are counted
    # by their shape.
    largest = max([p.numel() for p in loaded.model.parameters()] + [
        m.in_features * m.out_features for m in loaded.model.modules() if hasattr(m, "out_features")])
    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    target = os.path.join(os.path.dirname(output), "merged-memory")
    export_merged(loaded.model, loaded.max_rank, target, dtype="bfloat16", tokenizer=loaded.tokenizer,
                  max_shard_size=shard_mb * 2**20, show_progress=False)
    done.set()
    sampler.join()
    record = dict(rss_before_mb=before, rss_peak_mb=peak[0], growth_mb=peak[0] - before, shard_mb=shard_mb,
                  largest_layer_fp32_mb=largest * 4 / 2**20, merged_mb=_folder_mb(target, ".safetensors"))
    with open(output, "w") as handle:
        json.dump(record, handle)


def run_memory_case(model_path: str, folder: str, shard_mb: int, threads: int, workdir: str) -> dict:
    output = os.path.join(workdir, "memory.json")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--memory_case", folder, "--model_path", model_path,
                    "--shard_mb", str(shard_mb), "--memory_out", output, "--threads", str(threads)], check=True)
    with open(output) as handle:
        return json.load(handle)


def to_markdown(rows: list[dict], memory: dict | None, args) -> str:
    lines = [f"Held-out perplexity: embedded Wikipedia, {args.windows} × {args.window_length} tokens; "
             f"{args.threads} torch thread(s), CPU.", "",
             "| adapter | route | rank | ppl | files (MB) | load (s) | export (s) |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        export = f"{row['export_s']:.1f}" if row.get("export_s") is not None else ""
        lines.append(f"| {row['adapter']} | {row['route']} | {row['rank'] or ''} | {row['ppl']:.3f} | "
                     f"{row['files_mb']:.0f} | {row['load_s']:.1f} | {export} |")
    if memory is not None:
        bound = memory["shard_mb"] + memory["largest_layer_fp32_mb"]
        lines += ["", "Merged export (bf16) in a fresh process, RSS sampled every 5 ms:", "",
                  "| RSS before (MB) | peak (MB) | growth (MB) | shard (MB) | largest layer fp32 (MB) | "
                  "growth / (shard + layer) | merged files (MB) |", "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {memory['rss_before_mb']:.0f} | {memory['rss_peak_mb']:.0f} | {memory['growth_mb']:.0f} | "
                  f"{memory['shard_mb']} | {memory['largest_layer_fp32_mb']:.0f} | {memory['growth_mb'] / bound:.2f} |"
                  f" {memory['merged_mb']:.0f} |"]
    return "\n".join(lines) + "\n"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quailora_rank", type=int, default=16)
    parser.add_argument("--trained_adapter", default=None, help="e.g. outputs/alpaca/adapter (make demo)")
    parser.add_argument("--qlora_adapter", default=None, help="a plain QLoRA adapter (the recipe with --quailora false)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window_length", type=int, default=256)
    parser.add_argument("--shard_mb", type=int, default=64, help="shard size of the memory case")
    parser.add_argument("--memory", action="store_true", help="also measure the merged export's peak memory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="bench/results/deploy")
    parser.add_argument("--memory_case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model_path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory_out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    from hf_quailora import load_dataset_any, make_token_windows, resolve
    from hf_quailora.quantization import quiet_bnb_warnings

    args = parse_args()
    torch.set_num_threads(args.threads)
    quiet_bnb_warnings()
    if args.memory_case:
        return memory_case(args.model_path, args.memory_case, args.shard_mb, args.memory_out)
    model_path = resolve(args.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    held_out = make_token_windows(tokenizer, list(load_dataset_any("wiki")["text"]), args.window_length, args.windows)
    workdir = tempfile.mkdtemp(prefix="bench-deploy-")
    start = build_quailora_start(model_path, tokenizer, list(load_dataset_any("c4")["text"]), args.quailora_rank,
                                 os.path.join(workdir, "quailora-start"))
    adapters = {f"QuAILoRA start (r = {args.quailora_rank})": start}
    for label, folder in (("make demo's trained adapter", args.trained_adapter),
                          ("plain QLoRA adapter", args.qlora_adapter)):
        if folder is not None:
            adapters[label] = folder
    rows = [dict(row, adapter="none") for row in measure_baselines(model_path, held_out)]
    for index, (label, folder) in enumerate(adapters.items()):
        rows += [dict(row, adapter=label) for row in measure_adapter(model_path, folder, held_out, workdir, str(index))]
        print(to_markdown(rows, None, args), flush=True)
    memory = run_memory_case(model_path, start, args.shard_mb, args.threads, workdir) if args.memory else None
    markdown = to_markdown(rows, memory, args)
    print(markdown)
    settings = {key: value for key, value in vars(args).items() if not key.endswith(("adapter", "_case", "_path", "_out"))}
    write_results(args.output, markdown, dict(rows=rows, memory=memory, adapters=list(adapters), args=settings))


if __name__ == "__main__":
    main()
