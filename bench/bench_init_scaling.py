"""Peak memory and wall time of QuAILoRA initialisation as models grow: streamed (block replay) against all at once.

Synthetic Llama-shaped checkpoints (random weights, saved once as safetensors under the hf_quailora cache) of
growing width and depth, loaded in NF4 with LoRA r on every linear layer, initialised with the closed form on
random token ids. Each case runs in a fresh process: Linux resets the process's high-water mark (VmHWM) on
`echo 5 > /proc/self/clear_refs` after loading, so the peak *extra* memory of the initialisation is
`VmHWM after init − VmRSS before init`, not hidden by the loading peak. Two CPU-allocator effects would otherwise
decide the number instead of the tensors (on a GPU, PyTorch's caching allocator reuses freed blocks):
- glibc keeps freed heap pages, so tensors freed while loading are reused by the init and its growth is hidden (a
  run read 5 MiB at the smallest shape); `malloc_trim(0)` gives them back to the OS before `VmRSS before init` is
  read, so every byte the init needs grows RSS;
- glibc raises its mmap threshold after the first large free (up to 32 MiB) and serves later tensors from a heap
  that fragments, so the high-water mark drifts upward with every block (+230 MiB over 30 blocks at the smallest
  shape, with no tensor left alive: counted by `gc`). Each case runs with `MALLOC_MMAP_THRESHOLD_=131072` (fixed):
  every tensor of 128 KiB or more is its own mapping, returned when freed.
A warm-up with small tensors (one small solve, one
8-token forward) runs first, so the peak does not include lazily loaded code. Printed next to it: the README's formula
(`hf_quailora.quailora.memory.estimate_init_memory`) and the ratio of the two. Writes a Markdown table, JSON and
a PNG of memory against parameters.

On a GPU (`--device cuda`) the checkpoints are bf16, the model computes in bf16, and the peak is counted in tensor
bytes by PyTorch's allocator: `torch.cuda.max_memory_allocated()` during the init minus `memory_allocated()` before
it (the CUDA context and the allocator's cache are not tensors and are not counted). `--models` adds the shapes of
real models (their public configs, with a 1,024-token vocabulary: the init works on the blocks, not the
embeddings). The CPU's peak RSS is printed beside it, since the full-precision `W` is read there.

Usage (the runs recorded in the README):

    HF_HUB_OFFLINE=1 python bench/bench_init_scaling.py --threads 2
    HF_HUB_OFFLINE=1 python bench/bench_init_scaling.py --device cuda --shapes 576x1536x30,2048x8192x8 \
        --models Llama-3.2-1B,Llama-3.2-3B --windows 128 --window-length 512 --batch-size 8

Every case uses `torch.set_num_threads(--threads)`; timings are compared within one run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time


if __package__:  # imported as `bench.<script>` or run with `python -m`
    from ._common import peft_model, status_bytes, write_file, write_results
else:  # run as `python bench/<script>.py`: bench/ itself is on sys.path
    from _common import peft_model, status_bytes, write_file, write_results


DEFAULT_SHAPES = "576x1536x30,1024x4096x16,2048x8192x8"
VOCAB = 1024  # small: the blocks, not the embeddings, are what the initialisation works on
HEAD_DIM = 64


# The public configs (config.json) of the models in the README's memory contract.
REAL_MODELS = {
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.2-3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "Qwen2.5-14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, head_dim=128, vocab_size=152064, tie_word_embeddings=False),
    "Qwen2.5-32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, head_dim=128, vocab_size=152064, tie_word_embeddings=False),
    "Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
GPU_SIZES = (24, 48, 80)  # GB
MMAP_THRESHOLD = 128 * 1024  # bytes: glibc serves every tensor from here up by its own mapping (see the docstring)


def memory_contract(num_samples: int = 128, max_length: int = 512, batch_size: int = 8) -> str:
    """The formula for real models: 4-bit model, Gram bytes all at once and streamed, and which GPUs fit."""
    from types import SimpleNamespace

    from hf_quailora.quailora.memory import estimate_init_memory

    gib = 2**30
    lines = [
        "Formula (the rows up to Llama-3.1-8B were measured on an H200 below, before the in-place Cholesky; the "
        "larger ones were not): "
        f"{num_samples} × {max_length} calibration tokens in batches of "
        f"{batch_size}, float64 solves, bf16 activations, LoRA r=16 on every linear layer (float32 factors). "
        "\"old\": every Gram matrix at once, in float64 (the original design); \"streamed\": one block at a time, "
        "float32 Gram matrices, solves and Gram matrices on the GPU (`solve_device=\"model\", gram_device=\"model\"`; "
        "where the defaults put them: the contract with fine-tuning). \"fits\": NF4 model + the init's peak ≤ the "
        "GPU (GB = 10⁹ bytes); "
        "fine-tuning itself then needs what QLoRA needs.",
        "",
        "| model | NF4 model | Gram all at once (old) | Gram per block (streamed) | solve workspace | old peak | "
        "streamed peak | " + " | ".join(f"fits {size} GB: old / streamed" for size in GPU_SIZES) + " |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---|" * len(GPU_SIZES),
    ]
    for name, config in REAL_MODELS.items():
        terms = estimate_init_memory(SimpleNamespace(**config), num_samples, max_length, batch_size)
        old = estimate_init_memory(SimpleNamespace(**config), num_samples, max_length, batch_size, gram_bytes=8)
        fits = [
            " / ".join("yes" if terms.model_4bit + peak <= size * 1e9 else "no"
                       for peak in (old.all_at_once_peak, terms.streamed_peak))
            for size in GPU_SIZES
        ]
        lines.append(
            f"| {name} | {terms.model_4bit / gib:.1f} GiB | {old.gram_all_blocks / gib:.1f} GiB | "
            f"{terms.gram_per_block / gib:.2f} GiB | {terms.solve_workspace / gib:.2f} GiB | "
            f"{old.all_at_once_peak / gib:.1f} GiB | {terms.streamed_peak / gib:.2f} GiB | " + " | ".join(fits) + " |"
        )
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """`"576x1536x30,…"` → [(hidden, intermediate, layers), …]; `""` → [] (with `--models`)."""
    shapes = []
    for item in text.split(",") if text.strip() else []:
        parts = item.strip().split("x")
        if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise ValueError(f"--shapes: {item!r} is not hidden x intermediate x layers, e.g. 1024x4096x16.")
        if int(parts[0]) % HEAD_DIM:
            raise ValueError(f"--shapes: hidden {parts[0]} must be a multiple of the head size {HEAD_DIM}.")
        shapes.append(tuple(int(part) for part in parts))
    return shapes


def parse_models(text: str) -> list[str]:
    """`"Llama-3.2-1B,…"` → names of `REAL_MODELS`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in REAL_MODELS]
    if unknown:
        raise ValueError(f"--models: {', '.join(unknown)} not among {', '.join(REAL_MODELS)}.")
    return names


def llama_config(hidden: int, intermediate: int, layers: int):
    from transformers import LlamaConfig

    heads = hidden // HEAD_DIM
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       tie_word_embeddings=False)


def case_config(case):
    """The LlamaConfig of a case: a shape `(hidden, intermediate, layers)` or a name of `REAL_MODELS` (whose
    vocabulary is cut to `VOCAB`)."""
    from transformers import LlamaConfig

    if isinstance(case, str):
        return LlamaConfig(**{**REAL_MODELS[case], "vocab_size": VOCAB, "tie_word_embeddings": False},
                           max_position_embeddings=4096)
    return llama_config(*case)


def case_label(case) -> str:
    return case if isinstance(case, str) else "x".join(map(str, case))


def checkpoint(case, device: str = "cpu") -> str:
    """The synthetic checkpoint of `case`, built once (random weights; float32 safetensors for the CPU, bf16 built
    on the GPU for `device="cuda"`, as users' checkpoints are)."""
    import torch
    from transformers import LlamaForCausalLM

    from hf_quailora.embedded.cache import build_once, get_cache_dir

    def build(folder) -> None:
        torch.manual_seed(0)
        if device == "cpu":
            LlamaForCausalLM(case_config(case)).save_pretrained(folder)
            return
        with torch.device(device):
            model = LlamaForCausalLM(case_config(case)).to(torch.bfloat16)
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()  # the cases run in fresh processes: give this one's cache back to the GPU

    suffix = "" if device == "cpu" else "-bf16"
    return str(build_once(os.path.join(get_cache_dir(), "bench", f"llama-{case_label(case)}{suffix}"), build))


def _return_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`), so that RSS grows with every new byte."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the measured peak may then be lower than the init's real need
        pass


def run_case(path: str, streaming: str, args) -> dict:
    """One initialisation in this (fresh) process; its peak extra memory, time and the formula's terms."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_quailora import QuAILoRAConfig, quailora_init
    from hf_quailora.quailora.solvers import solve_closed_form
    from hf_quailora.quantization import disable_bnb_cpu_fast_path, make_bnb_config

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=make_bnb_config("nf4", compute_dtype=dtype),
                                                 device_map={"": 0} if cuda else "cpu", dtype=dtype)
    disable_bnb_cpu_fast_path(model)
    model = peft_model(model, rank=args.rank)
    ids = torch.randint(0, VOCAB, (args.windows, args.window_length), generator=torch.Generator().manual_seed(0))
    config = QuAILoRAConfig(streaming=streaming, calibration_samples=None, calibration_batch_size=args.batch_size,
                            show_progress=False, solve_device=args.solve_device, gram_device=args.gram_device)
    import logging  # "auto"'s choice and the per-group calibration and solve spans (the overlap) go to stderr

    logging.getLogger("hf_quailora.quailora.placement").addHandler(logging.StreamHandler())
    logging.getLogger("hf_quailora.quailora.placement").setLevel(logging.DEBUG)  # spans without overlap: DEBUG
    placement = _chosen_placement(config, model, args.rank)
    # Warm-up with small tensors: lazily loaded code (LAPACK/cuSOLVER kernels, bitsandbytes) and thread pools are
    # paid here, so the measured peak is the initialisation's data, not the first call's code pages. (Not a warm-up
    # init: its full-size Gram matrices would stay in the allocator and hide the real init's peak.)
    device = next(model.parameters()).device
    E = torch.randn(64, 32, dtype=torch.float64, device=device)
    X = torch.randn(128, 32, dtype=torch.float64, device=device)
    solve_closed_form(E, X.T @ X, 4, 1e-4)
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=ids[:1, :8].to(device))
    del E, X
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    _return_free_heap()  # freed loading buffers kept by malloc would be reused and hide the init's growth
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM: the loading peak must not hide the initialisation's
    before = status_bytes("VmRSS")
    started = time.perf_counter()
    report = quailora_init(model, ids, config)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    cpu_peak = status_bytes("VmHWM") - before
    result = {"peak_extra": cpu_peak, "seconds": seconds, "streaming": report.streaming, "placement": placement,
              "calibration_seconds": report.calibration_seconds, "solve_seconds": report.solve_seconds}
    if cuda:
        result.update(peak_extra=torch.cuda.max_memory_allocated() - gpu_before, cpu_peak_extra=cpu_peak,
                      gpu_reserved_peak=torch.cuda.max_memory_reserved(), gpu=torch.cuda.get_device_name())
    return result


def _chosen_placement(config, model, rank: int) -> list[bool]:
    """`[solve_on_cpu, gram_on_cpu]` as `quailora_init` will decide them for this model (`choose_placement`, which
    logs "auto"'s choice)."""
    import torch

    from hf_quailora.quailora.placement import choose_placement

    layers = [(module.out_features, module.in_features, rank) for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and ".layers." in name and "lora_" not in name]
    placement = choose_placement(config, model, layers)
    return [placement.solve_on_cpu, placement.gram_on_cpu]


def formula_placement(terms, config, args) -> tuple[bool, bool]:
    """`(solve_on_cpu, gram_on_cpu)` for the formula: the settings, or `"auto"`'s choice on a GPU with room (aimed
    under a QLoRA step at batch 1 × 2048, `hf_quailora.quailora.placement.FINETUNE_TARGET`)."""
    from hf_quailora.quailora.finetune_memory import estimate_finetune_memory
    from hf_quailora.quailora.placement import FINETUNE_TARGET, decide_placement

    solve, gram = getattr(args, "solve_device", "auto"), getattr(args, "gram_device", "auto")
    if getattr(args, "device", "cpu") != "cuda":
        return False, False  # on the CPU every placement is the same memory
    target = estimate_finetune_memory(config, rank=args.rank, activation_bytes=2, **FINETUNE_TARGET).training_extra
    choice = decide_placement(terms, 2**50, target if "auto" in (solve, gram) else None, solve, gram)
    return choice.solve_on_cpu, choice.gram_on_cpu


def formula(case, args) -> dict:
    from hf_quailora.quailora.memory import estimate_init_memory

    # activations in the compute dtype (fp32 on the CPU, bf16 on the GPU); peft keeps the adapters in float32; the
    # synthetic models have no tied embeddings
    activation_bytes = 2 if getattr(args, "device", "cpu") == "cuda" else 4
    terms = estimate_init_memory(case_config(case), num_samples=args.windows, max_length=args.window_length,
                                 batch_size=args.batch_size, activation_bytes=activation_bytes, rank=args.rank,
                                 adapter_bytes=4)
    placement = formula_placement(terms, case_config(case), args)
    return {"parameters": terms.parameters, "gram_per_block": terms.gram_per_block,
            "gram_all_blocks": terms.gram_all_blocks, "replay": terms.placed_peak(*placement),
            "off": terms.all_at_once_peak, "formula_placement": list(placement),
            "placed": {f"{int(solve)}{int(gram)}": terms.placed_peak(solve, gram) for solve in (0, 1) for gram in (0, 1)}}


def measure(args, on_row=None) -> list[dict]:
    """Every case × mode in a fresh process; `on_row(rows)` after each (so an interrupted run keeps its rows).
    With `--time-limit`, cases and modes that would start after it are skipped (and said so)."""
    rows, started = [], time.monotonic()
    cases = [*parse_shapes(args.shapes), *parse_models(args.models)]
    def out_of_time(what: str) -> bool:
        if args.time_limit and time.monotonic() - started > args.time_limit:
            print(f"{what}: skipped, --time-limit {args.time_limit:.0f} s reached", flush=True)
            return True
        return False

    for case in cases:
        if out_of_time(case_label(case)):
            continue
        path = checkpoint(case, args.device)
        expected = formula(case, args)
        for streaming in args.modes.split(","):
            if out_of_time(f"{case_label(case)} {streaming}"):
                continue
            command = [sys.executable, os.path.abspath(__file__), "--case", path, streaming, *sys.argv[1:]]
            env = {**os.environ, "TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
            output = subprocess.run(command, capture_output=True, text=True, env=env)
            if output.returncode:
                raise RuntimeError(f"case {case_label(case)} {streaming} failed:\n{output.stderr[-3000:]}")
            result = json.loads(output.stdout.strip().splitlines()[-1])
            print("\n".join(line for line in output.stderr.splitlines() if "QuAILoRA" in line), flush=True)
            peak = expected[streaming]
            if args.device == "cuda" and streaming == "replay":  # the formula of the placement the init took
                peak = expected["placed"]["{:d}{:d}".format(*result["placement"])]
            rows.append({**_case_key(case), **result, "formula": peak, **expected})
            print(f"{case_label(case)} {streaming}: {result['peak_extra'] / 2**20:.0f} MiB, {result['seconds']:.1f} s",
                  flush=True)
            if on_row:
                on_row(rows)
    return rows


def rerender(args) -> list[dict]:
    """`--rerender`: the measured rows of `<output>.json` with the formula recomputed by the current code."""
    with open(args.output + ".json") as handle:
        data = json.load(handle)
    for name, value in data["settings"].items():  # the measured run's settings, not this call's defaults
        if name not in ("output", "rerender", "case", "contract"):
            setattr(args, name, value)
    args.device = data["settings"].get("device", "cpu")
    rows = []
    for row in data["rows"]:
        case = _row_case(row)
        expected = formula(case, args)
        rows.append({**row, **expected, **_case_key(case), "formula": expected[row["streaming"]]})
    return rows


def _case_key(case) -> dict:
    """How a row names its case: `{"model": name}` or `{"shape": (hidden, intermediate, layers)}`."""
    return {"model": case} if isinstance(case, str) else {"shape": case}


def _row_case(row):
    return row["model"] if "model" in row else tuple(row["shape"])


def to_markdown(rows: list[dict], args) -> str:
    mib = 2**20
    cuda = getattr(args, "device", "cpu") == "cuda"
    gpu = next((row["gpu"] for row in rows if "gpu" in row), "a CUDA GPU")
    where = (f"on {gpu}: bf16 checkpoints, bf16 compute and activations, float32 adapters; peak = CUDA tensor bytes "
             "(max_memory_allocated during the init − memory_allocated before); CPU peak RSS of the same process "
             "beside it" if cuda else
             "float32 adapters and activations; peak = extra peak RSS, a fresh process per case")
    lines = [
        f"Llama-shaped NF4 checkpoints (random weights), LoRA r={args.rank} on all linear layers, closed form, "
        f"{args.windows} × {args.window_length} calibration tokens in batches of {args.batch_size}, float32 Gram "
        f"matrices (the default), float64 solves; {where}; torch threads {args.threads}.",
        "",
        "| hidden / intermediate / layers | parameters | init | Gram bytes alive (formula) | peak extra memory "
        "(measured) | formula | measured / formula | wall time (s) | time / all at once |"
        + (" CPU peak extra |" if cuda else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    baseline = {case_label(_row_case(row)): row["seconds"] for row in rows if row["streaming"] == "off"}
    for row in rows:
        case = _row_case(row)
        config = case_config(case)
        shape = "{} / {} / {}".format(config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        if isinstance(case, str):
            shape = f"{case} ({shape})"
        gram = row["gram_per_block"] if row["streaming"] == "replay" else row["gram_all_blocks"]
        label = case_label(case)
        ratio = f"{row['seconds'] / baseline[label]:.2f}" if label in baseline else "–"
        init = "streamed (replay)" if row["streaming"] == "replay" else "all at once"
        if any(row.get("placement") or ()):  # solves and / or Gram matrices on the CPU
            init += ", " + " + ".join(what for what, cpu in zip(("solves", "Gram"), row["placement"]) if cpu) + " on CPU"
        lines.append(
            "| {} | {:.0f}M | {} | {:,.0f} MiB | {:,.0f} MiB | {:,.0f} MiB | {:.2f} | {:.1f} | {} |".format(
                shape, row["parameters"] / 1e6, init, gram / mib,
                row["peak_extra"] / mib, row["formula"] / mib, row["peak_extra"] / row["formula"], row["seconds"],
                ratio,
            )
            + (" {:,.0f} MiB |".format(row["cpu_peak_extra"] / mib) if cuda else "")
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, device: str = "cpu") -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.subplots()
    for streaming, color in (("off", "tab:red"), ("replay", "tab:blue")):
        mine = sorted((row for row in rows if row["streaming"] == streaming), key=lambda row: row["parameters"])
        if not mine:
            continue
        label = "all at once" if streaming == "off" else "streamed (replay)"
        params = [row["parameters"] / 1e6 for row in mine]
        axes.plot(params, [row["peak_extra"] / 2**30 for row in mine], "o-", color=color, label=f"{label}: measured")
        axes.plot(params, [row["formula"] / 2**30 for row in mine], "x--", color=color, label=f"{label}: formula")
    axes.set_xlabel("parameters (millions)")
    axes.set_ylabel("peak extra memory of the init (GiB)")
    where = "GPU, tensor bytes, bf16 compute" if device == "cuda" else "CPU, peak RSS"
    axes.set_title(f"QuAILoRA init memory ({where})", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_file(path, lambda temporary: figure.savefig(temporary, dpi=120))


def write_outputs(rows: list[dict], args) -> str:
    """The Markdown table, the JSON (settings and rows) and the plot under `--output`; returns the table."""
    table = to_markdown(rows, args)
    write_results(args.output, table + "\n", {"settings": vars(args), "rows": rows})
    plot(rows, args.output + ".png", getattr(args, "device", "cpu"))
    return table


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="hidden x intermediate x layers, comma-separated ('' for none, with --models)")
    parser.add_argument("--models", default="", help=f"real models' shapes, comma-separated: {', '.join(REAL_MODELS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: bf16 checkpoints and compute on the GPU, peak counted in CUDA tensor bytes")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds: cases and modes that would start later are skipped (0: no limit)")
    parser.add_argument("--modes", default="off,replay", help="streaming modes to compare (off first: the baseline)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--windows", type=int, default=16, help="calibration sequences")
    parser.add_argument("--window-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solve-device", choices=("auto", "model", "cpu"), default="auto",
                        help="QuAILoRAConfig.solve_device; not 'auto': print each group's calibration and solve spans")
    parser.add_argument("--gram-device", choices=("auto", "model", "cpu"), default="auto",
                        help="QuAILoRAConfig.gram_device ('auto' with --solve-device auto: QuAILoRA's default placement)")
    parser.add_argument("--output", default="bench/results/init_scaling", help="writes .md, .json and .png")
    parser.add_argument("--contract", action="store_true", help="print the formula's table for real models and stop")
    parser.add_argument("--rerender", action="store_true",
                        help="no new measurement: recompute the formula for the rows in <output>.json and rewrite")
    parser.add_argument("--case", nargs=2, metavar=("PATH", "STREAMING"), help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = make_parser().parse_args()
    if args.contract:
        print(memory_contract())
        return
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], args)))
        return
    if args.device == "cuda" and not args.rerender:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to torch; run without it for the CPU.")
    if not parse_shapes(args.shapes) and not parse_models(args.models) and not args.rerender:
        raise ValueError("Nothing to measure: give --shapes, --models or both.")
    rows = rerender(args) if args.rerender else measure(args, on_row=lambda rows: write_outputs(rows, args))
    table = write_outputs(rows, args)
    print("\n" + table)
    print(f"\nWrote {args.output}.md, .json and .png")


if __name__ == "__main__":
    main()
