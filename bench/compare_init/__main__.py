"""Fine-tuning comparison of LoRA starts on a quantized base: the QuAILoRA paper's experiment at our scale.

Every arm fine-tunes the same model on the same Alpaca examples, in the same order, for the same number of steps,
with the same LoRA (rank r, `lora_alpha = r`, all linear layers) and the same random A; only the base and the
starting values of the adapter differ:

| arm        | base      | adapter start                                                   |
|------------|-----------|-----------------------------------------------------------------|
| `qlora`    | NF4       | B = 0 (QLoRA)                                                   |
| `svd`      | NF4       | truncated SVD of E = W − Q, uncalibrated (LoftQ-style, Q fixed) |
| `quailora` | NF4       | QuAILoRA, calibrated closed form on C4 windows                  |
| `int8`     | LLM.int8  | B = 0                                                           |
| `fp32`     | none      | B = 0                                                           |
| `dynamic`  | NF4       | QuAILoRA, trained by `DynamicRankTrainer` (constant scaling)    |

Reported at the start and after fine-tuning (and every `--eval_steps` for the convergence plot): held-out
Wikipedia perplexity and the loss on held-out Alpaca responses (the last `--eval_examples` examples, never
trained on). "gap closed" is the fraction of the NF4 → int8 perplexity gap an arm closes,
`(ppl_qlora − ppl_arm) / (ppl_qlora − ppl_int8)` (the paper's headline: 75% on average, after fine-tuning).
The dynamic arm also reports per-rank perplexity and Alpaca loss at `--dynamic_eval_ranks`.

Launch (CPU; see the README for a timed run on the embedded SmolLM2-135M):

    python recipes/compare_init.py --threads 1
    python recipes/compare_init.py --arms qlora,quailora,int8 --steps 40 --rank 16 --eval_windows 16
    python recipes/compare_init.py --model_name_or_path meta-llama/Llama-3.1-8B --steps 500  # with the Hub and a GPU

Outputs in `--output_dir`: `results.md` (table), `results.json` (everything, curves included) and
`convergence.png`. Every option: `python recipes/compare_init.py --help`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, HfArgumentParser, TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_quailora import (
    DynamicRankConfig,
    DynamicRankTrainer,
    QuAILoRAConfig,
    compute_perplexity,
    load_dataset_any,
    load_quantized_model,
    make_token_windows,
    quailora_init,
    resolve,
    use_rank,
)
from hf_quailora.embedded.data import load_alpaca_sft


logger = logging.getLogger(__name__)

# arm -> (quantization, init solver or None for B = 0, dynamic-rank training)
ARMS: dict[str, tuple[str, str | None, bool]] = {
    "qlora": ("nf4", None, False),
    "svd": ("nf4", "svd", False),
    "quailora": ("nf4", "closed_form", False),
    "int8": ("int8", None, False),
    "fp32": ("none", None, False),
    "dynamic": ("nf4", "closed_form", True),
}
ARM_LABELS = {
    "qlora": "QLoRA (NF4, B = 0)",
    "svd": "SVD start (NF4, uncalibrated)",
    "quailora": "QuAILoRA (NF4, closed form)",
    "int8": "LLM.int8 base (B = 0)",
    "fp32": "fp32 base (B = 0)",
    "dynamic": "dynamic rank (NF4, QuAILoRA, r_max)",
}


@dataclass
class CompareScriptArguments:
    """Settings of the fine-tuning comparison recipe.

    Parameters:
        > Arms and model

        arms (`str`, defaults to all six): comma-separated subset of `qlora,svd,quailora,int8,fp32,dynamic`.
        model_name_or_path (`str`, defaults to `"smollm2-135m"`): embedded name, folder or Hub id.
        rank (`int`, defaults to 16): LoRA r; `lora_alpha = r` (scaling 1).
        target_modules (`str`, defaults to `"all-linear"`): peft target modules (comma-separated or all-linear).

        > Training

        steps (`int`, defaults to 40): optimizer steps of every arm.
        batch_size (`int`, defaults to 4): examples per step.
        learning_rate (`float`, defaults to 2e-4), lr_scheduler_type (`str`, defaults to `"constant"`).
        max_length (`int`, defaults to 256): tokens per training/eval example (prompt + response, truncated).
        seed (`int`, defaults to 42): the same for every arm (LoRA A init, data order, dropout-free).
        adapter_dtype (`str`, defaults to `"float32"`): trl casts adapters of quantized models to bf16; we cast them
            back so every arm trains fp32 adapters (`"bfloat16"` keeps trl's QLoRA behaviour for the 8/4-bit arms).

        > Data

        train_data (`str`, defaults to `"alpaca"`): Alpaca-format data (embedded name or local JSON).
        train_examples (`int`, *optional*): training examples, taken from the front; default: all before the
            held-out tail.
        holdout_examples (`int`, defaults to 200): the tail of the data never trained on (the project's lm-eval tasks
            use the last 200 embedded Alpaca examples).
        eval_examples (`int`, defaults to 200): the last examples (within the held-out tail) whose response loss is
            reported; lower it to save time on a CPU.
        perplexity_data (`str`, defaults to `"wiki"`), eval_windows (`int`, defaults to 16), window_length (256).
        calibration_data (`str`, defaults to `"c4"`), calibration_windows (`int`, defaults to 32).

        > Evaluation and dynamic rank

        eval_steps (`int`, defaults to 10): evaluate every this many steps (and at start and end).
        dynamic_eval_ranks (`str`, defaults to `"1,2,4,8,16"`), dynamic_update_rule (`str`, defaults to `"nested"`).

        > Run

        output_dir (`str`), threads (`int`, defaults to 1): torch threads (stated in the results).
    """

    # Arms and model
    arms: str = field(default="qlora,svd,quailora,int8,fp32,dynamic", metadata={"help": "Comma-separated arms."})
    model_name_or_path: str = field(default="smollm2-135m", metadata={"help": "Embedded name, folder or Hub id."})
    rank: int = field(default=16, metadata={"help": "LoRA rank r (lora_alpha = r)."})
    target_modules: str = field(default="all-linear", metadata={"help": "peft target_modules (comma-separated)."})
    # Training
    steps: int = field(default=40, metadata={"help": "Optimizer steps of every arm."})
    batch_size: int = field(default=4, metadata={"help": "Examples per optimizer step."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name."})
    max_length: int = field(default=256, metadata={"help": "Tokens per training/eval example."})
    seed: int = field(default=42, metadata={"help": "Seed shared by every arm."})
    adapter_dtype: str = field(
        default="float32", metadata={"help": "Dtype of the trained adapter.", "choices": ["float32", "bfloat16"]}
    )
    # Data
    train_data: str = field(default="alpaca", metadata={"help": "Alpaca-format data: embedded name or JSON file."})
    train_examples: int | None = field(
        default=None, metadata={"help": "Training examples (default: all but the tail)."}
    )
    holdout_examples: int = field(default=200, metadata={"help": "Tail of the Alpaca data never trained on."})
    eval_examples: int = field(
        default=200, metadata={"help": "Last examples whose response loss is reported (≤ holdout)."}
    )
    perplexity_data: str = field(default="wiki", metadata={"help": "Held-out text for perplexity."})
    eval_windows: int = field(default=16, metadata={"help": "Held-out perplexity windows."})
    window_length: int = field(default=256, metadata={"help": "Tokens per perplexity/calibration window."})
    calibration_data: str = field(default="c4", metadata={"help": "QuAILoRA calibration text."})
    calibration_windows: int = field(default=32, metadata={"help": "QuAILoRA calibration windows."})
    # Evaluation and dynamic rank
    eval_steps: int = field(default=10, metadata={"help": "Evaluate every this many steps."})
    dynamic_eval_ranks: str = field(default="1,2,4,8,16", metadata={"help": "Ranks of the dynamic arm's curve."})
    dynamic_update_rule: str = field(
        default="nested", metadata={"help": "DyLoRA update rule.", "choices": ["nested", "frozen"]}
    )
    # Run
    output_dir: str = field(default="outputs/compare_init", metadata={"help": "Where results are written."})
    threads: int = field(default=1, metadata={"help": "torch threads."})


def parse_arms(text: str) -> list[str]:
    arms = [arm.strip() for arm in text.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARMS]
    if not arms or unknown:
        raise ValueError(f"`--arms` ({text!r}) holds unknown arms {unknown}; choose among {', '.join(ARMS)}.")
    if len(set(arms)) != len(arms):
        raise ValueError(f"`--arms` ({text!r}) repeats an arm; name each once.")
    return arms


def parse_ranks(text: str, rank: int) -> list[int]:
    try:
        ranks = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise ValueError(f"`--dynamic_eval_ranks` ({text!r}) must be comma-separated integers, e.g. '1,2,4,8,16'.")
    if not ranks or ranks[0] < 1 or ranks[-1] > rank:
        raise ValueError(f"`--dynamic_eval_ranks` ({text!r}) must hold ranks in [1, --rank = {rank}].")
    return ranks


def check_arguments(args: CompareScriptArguments) -> list[str]:
    """Every check that can fail before a model is loaded; returns the parsed arms."""
    arms = parse_arms(args.arms)
    for name in ("steps", "rank", "batch_size", "eval_steps", "eval_windows", "eval_examples", "holdout_examples",
                 "threads"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`--{name}` ({value!r}) must be an integer of at least 1.")
    if args.eval_examples > args.holdout_examples:
        raise ValueError(
            f"`--eval_examples` ({args.eval_examples}) exceeds `--holdout_examples` ({args.holdout_examples}): "
            "evaluated examples must be held out from training; lower the first or raise the second."
        )
    if args.train_examples is not None and args.train_examples < 1:
        raise ValueError(f"`--train_examples` ({args.train_examples}) must be at least 1 (or omitted).")
    if args.max_length < 8 or args.window_length < 8:
        raise ValueError(
            f"`--max_length` ({args.max_length}) and `--window_length` ({args.window_length}) must be at least 8."
        )
    if any(ARMS[arm][1] in ("closed_form",) for arm in arms) and args.calibration_windows < 1:
        raise ValueError(f"`--calibration_windows` ({args.calibration_windows}) must be ≥ 1 for QuAILoRA arms.")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise ValueError(f"`--learning_rate` ({args.learning_rate}) must be a positive number.")
    if "dynamic" in arms:
        parse_ranks(args.dynamic_eval_ranks, args.rank)
    return arms


class HeldOutPerplexityCallback(TrainerCallback):
    """Adds held-out perplexity to every evaluation and records the convergence curve of one arm."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows
        self.history: list[dict] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if "eval_loss" not in (metrics or {}):  # the dynamic arm's rank sweeps use another prefix
            return
        entry = {"step": state.global_step, "eval_loss": metrics.get("eval_loss")}
        entry.update({key[len("eval_"):]: value for key, value in metrics.items() if key.startswith("eval_loss@r")})
        entry["perplexity"] = compute_perplexity(model, self.windows)
        self.history.append(entry)
        logger.info("step %d: %s", state.global_step, entry)


def _gap(qlora: float | None, value: float | None, int8: float | None) -> float | None:
    if None in (qlora, value, int8) or qlora == int8:
        return None
    return (qlora - value) / (qlora - int8)


def _fmt(value, pattern="{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def run_arm(arm, args, tokenizer, train, held_out, windows, calibration, dynamic_ranks) -> dict:
    quantization, solver, dynamic = ARMS[arm]
    started = time.perf_counter()
    model, _ = load_quantized_model(args.model_name_or_path, quantization)
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    torch.manual_seed(args.seed)  # the same random A in every arm
    lora = LoraConfig(
        r=args.rank, lora_alpha=args.rank, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    settings = dict(
        output_dir=os.path.join(args.output_dir, arm),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        logging_steps=args.eval_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="no",
        report_to="none",
        bf16=False,  # fp32 compute in every arm; SFTConfig's bf16 default fails on a CPU
        use_cpu=not torch.cuda.is_available(),
        max_length=args.max_length,
        seed=args.seed,
        gradient_checkpointing=False,  # faster on a CPU; memory is no issue at this size
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    perplexity = HeldOutPerplexityCallback(windows)
    trainer_kwargs = dict(
        train_dataset=train, eval_dataset=held_out, processing_class=tokenizer, callbacks=[perplexity]
    )
    if dynamic:
        config = DynamicRankConfig(**settings, min_rank=1, rank_scaling="constant",
                                   update_rule=args.dynamic_update_rule, eval_ranks=dynamic_ranks)
        trainer = DynamicRankTrainer(model, args=config, **trainer_kwargs)
    else:
        trainer = SFTTrainer(model, args=SFTConfig(**settings), **trainer_kwargs)
    for name, dataset in (("training", trainer.train_dataset), ("held-out", trainer.eval_dataset)):
        if len(dataset) == 0:  # trl drops examples whose response was truncated away entirely
            raise ValueError(
                f"No {name} example keeps any response token within --max_length {args.max_length}; raise it."
            )
    # trl casts the adapters of quantized models to bf16 (QLoRA's recipe); the optimizer does not exist yet, so
    # recasting here gives every arm the same adapter dtype, and QuAILoRA writes its factors into that dtype.
    dtype = getattr(torch, args.adapter_dtype)
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)

    init_seconds = None
    if solver is not None:
        init_started = time.perf_counter()
        quailora_init(
            trainer.model,
            calibration if solver != "svd" else None,
            QuAILoRAConfig(solver=solver, num_samples=None, max_length=args.window_length, show_progress=False),
        )
        init_seconds = time.perf_counter() - init_started

    result: dict = {"arm": arm, "label": ARM_LABELS[arm], "quantization": quantization, "init": solver or "B = 0",
                    "init_seconds": init_seconds}
    if dynamic:
        result["per_rank"] = {"start": evaluate_ranks(trainer, windows, dynamic_ranks)}
        trainer.eval_ranks = [trainer.max_rank]  # intermediate evaluations at r_max only (cost)
    trainer.evaluate()
    train_started = time.perf_counter()
    trainer.train()
    result["train_seconds"] = time.perf_counter() - train_started
    if perplexity.history[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
    if dynamic:
        trainer.eval_ranks = dynamic_ranks
        result["per_rank"]["end"] = evaluate_ranks(trainer, windows, dynamic_ranks)
    start, end = perplexity.history[0], perplexity.history[-1]
    result.update(
        perplexity_start=start["perplexity"], perplexity_end=end["perplexity"],
        eval_loss_start=start["eval_loss"], eval_loss_end=end["eval_loss"],
        history=perplexity.history, seconds=time.perf_counter() - started,
        train_loss=[(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry],
    )
    logger.info("%s: ppl %.3f -> %.3f, Alpaca loss %.4f -> %.4f", arm, result["perplexity_start"],
                result["perplexity_end"], result["eval_loss_start"], result["eval_loss_end"])
    del trainer, model
    return result


def evaluate_ranks(trainer, windows, ranks) -> dict[str, dict[str, float]]:
    """Alpaca response loss (one evaluate() call covers every rank) and held-out perplexity at each rank."""
    trainer.eval_ranks = ranks
    metrics = trainer.evaluate(metric_key_prefix="rank_sweep")
    out = {}
    for b in ranks:
        with use_rank(trainer.model, b, rank_scaling="constant"):
            perplexity = compute_perplexity(trainer.model, windows)
        out[str(b)] = {"eval_loss": metrics[f"rank_sweep_loss@r{b}"], "perplexity": perplexity}
    return out


def to_markdown(results: list[dict], meta: dict) -> str:
    by_arm = {result["arm"]: result for result in results}
    qlora, int8 = by_arm.get("qlora"), by_arm.get("int8")
    lines = [
        f"Model {meta['model']}, LoRA r={meta['rank']} (alpha = r, {meta['target_modules']}), "
        f"{meta['steps']} steps × batch {meta['batch_size']}, lr {meta['learning_rate']} "
        f"({meta['lr_scheduler_type']}), max_length {meta['max_length']}, seed {meta['seed']}, adapters in "
        f"{meta['adapter_dtype']}. Perplexity: "
        f"{meta['eval_windows']}×{meta['window_length']} held-out {meta['perplexity_data']} tokens; Alpaca loss: "
        f"responses of the last {meta['eval_examples']} examples (the last {meta['holdout_examples']} are held out); "
        f"training on the first {meta['train_examples']}. torch {meta['torch']}, {meta['threads']} thread(s).",
        "",
        "| arm | ppl start | ppl end | Alpaca loss start | Alpaca loss end | gap closed start | gap closed end "
        "| init (s) | train (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        gaps = [
            _gap(
                qlora and qlora[f"perplexity_{when}"], result[f"perplexity_{when}"],
                int8 and int8[f"perplexity_{when}"],
            )
            for when in ("start", "end")
        ]
        lines.append(
            f"| {result['label']} | {result['perplexity_start']:.3f} | {result['perplexity_end']:.3f} | "
            f"{result['eval_loss_start']:.4f} | {result['eval_loss_end']:.4f} | {_fmt(gaps[0], '{:.1%}')} | "
            f"{_fmt(gaps[1], '{:.1%}')} | {_fmt(result['init_seconds'], '{:.1f}')} | {result['train_seconds']:.1f} |"
        )
    if "qlora" not in by_arm or "int8" not in by_arm:
        lines += ["", "gap closed needs both the `qlora` and `int8` arms."]
    lines += ["", "gap closed = (ppl_qlora − ppl_arm) / (ppl_qlora − ppl_int8), at the same point (start or end)."]
    if "dynamic" in by_arm:
        per_rank = by_arm["dynamic"]["per_rank"]
        lines += ["", "Dynamic-rank arm, per rank (truncated adapter, constant scaling):", "",
                  "| rank | ppl start | ppl end | Alpaca loss start | Alpaca loss end |", "|---:|---:|---:|---:|---:|"]
        for b in per_rank["start"]:
            s, e = per_rank["start"][b], per_rank["end"][b]
            lines.append(f"| {b} | {s['perplexity']:.3f} | {e['perplexity']:.3f} | {s['eval_loss']:.4f} | "
                         f"{e['eval_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_convergence(results: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dynamic = next((result for result in results if result["arm"] == "dynamic"), None)
    columns = 3 if dynamic else 2
    figure, axes = plt.subplots(1, columns, figsize=(5.2 * columns, 4))
    for index, result in enumerate(results):
        steps = [entry["step"] for entry in result["history"]]
        for axis, key in zip(axes, ("perplexity", "eval_loss")):
            values = [entry[key] for entry in result["history"]]
            axis.plot(steps, values, marker="o", label=result["arm"], color=f"C{index}")
    for axis, label in zip(axes, ("held-out perplexity", "held-out Alpaca response loss")):
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if dynamic:
        axis = axes[2]
        for when, style in (("start", "--"), ("end", "-")):
            ranks = [int(b) for b in dynamic["per_rank"][when]]
            axis.plot(ranks, [dynamic["per_rank"][when][str(b)]["perplexity"] for b in ranks], style, marker="o",
                      label=f"dynamic, {when}")
        for arm, style in (("qlora", ":"), ("int8", "-.")):
            match = next((result for result in results if result["arm"] == arm), None)
            if match:
                label = f"{arm} end (full rank)"
                axis.axhline(match["perplexity_end"], linestyle=style, color="gray", label=label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(ranks, [str(b) for b in ranks])
        axis.set_xlabel("LoRA rank (truncated)")
        axis.set_ylabel("held-out perplexity")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(args: CompareScriptArguments) -> list[dict]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    arms = check_arguments(args)
    dynamic_ranks = parse_ranks(args.dynamic_eval_ranks, args.rank) if "dynamic" in arms else None
    torch.set_num_threads(args.threads)

    # 1. Data, identical for every arm, checked before any training
    tokenizer = AutoTokenizer.from_pretrained(resolve(args.model_name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    alpaca = load_alpaca_sft(args.train_data)
    available = len(alpaca) - args.holdout_examples
    train_examples = args.train_examples if args.train_examples is not None else available
    if available < 1 or train_examples > available:
        raise ValueError(
            f"{args.train_data!r} has {len(alpaca)} examples: too few for --train_examples {train_examples} plus a "
            f"held-out tail of --holdout_examples {args.holdout_examples}; lower one of them."
        )
    train = alpaca.select(range(train_examples))
    held_out = alpaca.select(range(len(alpaca) - args.eval_examples, len(alpaca)))
    windows = make_token_windows(tokenizer, load_dataset_any(args.perplexity_data)["text"], args.window_length,
                                 args.eval_windows)
    calibration = None
    if any(ARMS[arm][1] == "closed_form" for arm in arms):
        calibration = make_token_windows(tokenizer, load_dataset_any(args.calibration_data)["text"],
                                         args.window_length, args.calibration_windows)

    # 2. The arms, one after another, freeing each model before the next
    results = []
    for arm in arms:
        logger.info("=== arm %s ===", arm)
        results.append(run_arm(arm, args, tokenizer, train, held_out, windows, calibration, dynamic_ranks))

    # 3. Report
    meta = {**asdict(args), "model": args.model_name_or_path, "train_examples": train_examples,
            "eval_windows": int(windows.shape[0]), "torch": torch.__version__, "platform": platform.machine()}
    os.makedirs(args.output_dir, exist_ok=True)
    table = to_markdown(results, meta)
    paths = {name: os.path.join(args.output_dir, name) for name in ("results.md", "results.json", "convergence.png")}
    with open(paths["results.md"], "w") as handle:
        handle.write(table)
    with open(paths["results.json"], "w") as handle:
        json.dump({"settings": meta, "arms": results}, handle, indent=1)
    plot_convergence(results, paths["convergence.png"])
    print("\n" + table)
    print("Wrote " + ", ".join(paths.values()))
    return results


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(CompareScriptArguments)


if __name__ == "__main__":
    (script_args,) = make_parser().parse_args_into_dataclasses()
    main(script_args)
