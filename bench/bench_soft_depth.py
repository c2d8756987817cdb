"""SoFT by depth (Kavehzadeh et al., 2023) against SFT read-out and SFT+ICT, on the real embedded models (NF4).

Per model and seed, from one QuAILoRA start (closed form on C4 windows, shared by the arms and seeds):

- `soft`: `DynamicRankTrainer` with `soft_exits` at about L/4, L/2, 3L/4, L (weight 1 each, or
  `--soft-exit-weights`), N steps;
- `sft`: the same trainer without exits, N steps; read out at each exit (`use_exit`);
- `sft+ict`: the `sft` adapter frozen; for each exit below L a copy of the final norm (the per-exit output head the
  model has besides the shared LM head) tuned N steps on that exit's loss, then evaluated there.

Each sub-model is scored on held-out Alpaca examples (response loss) and on Wikipedia windows (perplexity); the table
gives mean ± std over seeds. Part 2 times a 4-exit SoFT step against a plain step and reads the peak RSS of the
training phase, each in a fresh process, with the same thread count.

Usage (the run recorded in bench/RESULTS.md):

    HF_HUB_OFFLINE=1 python bench/bench_soft_depth.py --threads 1

A SoFT variant alone, its table then completed with an earlier run's SFT arms (same settings, seeds and start,
checked; `bench/_soft_depth_variants.py`):

    HF_HUB_OFFLINE=1 python bench/bench_soft_depth.py ... --arms soft --soft-exit-weights 0.1,0.1,0.1,1 --output W.json
    python bench/bench_soft_depth.py --report W.json --baseline bench/results/soft_depth3-smollm2-135m.json

All runs use `torch.set_num_threads(--threads)`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


if __package__:
    from ._common import peft_model, write_json
    from ._soft_depth_variants import EXIT_FRACTIONS, merge_baseline, parse_arms, parse_exit_weights
else:
    from _common import peft_model, write_json
    from _soft_depth_variants import EXIT_FRACTIONS, merge_baseline, parse_arms, parse_exit_weights


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="the LoRA's (SoFT and SFT)")
    parser.add_argument("--ict-learning-rate", type=float, default=1e-2, help="the per-exit norm's (SFT+ICT)")
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=12)
    parser.add_argument("--eval-windows", type=int, default=6)
    parser.add_argument("--window-length", type=int, default=128)
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--timing-steps", type=int, default=4, help="timed steps per probe (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default="soft,sft,ict",
                        help="the arms to run, comma-separated, of soft, sft, ict (ict needs sft): e.g. `soft` to "
                             "measure a SoFT variant against the SFT arms of an earlier run (see --baseline)")
    parser.add_argument("--soft-exit-weights", help="the SoFT arm's `soft_exit_weights`, comma-separated, one per "
                                                    "exit (default: 1 each)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--output", default="bench/results/soft_depth.json")
    parser.add_argument("--report", nargs="+", help="print the tables of these result JSON files and stop")
    parser.add_argument("--baseline", help="with --report: take the arms a reported run left out (--arms) from this "
                                           "earlier result JSON, after checking it has the same settings, seeds and "
                                           "start")
    parser.add_argument("--probe", choices=["plain", "soft", "soft-checkpoint"], help=argparse.SUPPRESS)  # a fresh process per case
    return parser.parse_args(argv)


def load_data(args, model_name):
    from transformers import AutoTokenizer

    from hf_quailora import load_dataset_any, make_token_windows, resolve
    from hf_quailora.embedded.data import load_alpaca_sft, split_holdout
    from hf_quailora.embedded.models import EMBEDDED_MODELS

    tokenizer = AutoTokenizer.from_pretrained(resolve(model_name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    available, tail = split_holdout(load_alpaca_sft("alpaca"))
    train, held_out = available.select(range(args.train_examples)), tail.select(range(args.eval_examples))
    bos = EMBEDDED_MODELS[model_name].needs_bos
    windows = make_token_windows(tokenizer, load_dataset_any("wiki")["text"], args.window_length, args.eval_windows,
                                 add_bos=bos)
    calibration = make_token_windows(tokenizer, load_dataset_any("c4")["text"], args.window_length,
                                     args.calibration_windows, add_bos=bos)
    return tokenizer, train, held_out, windows, calibration


def fresh_model(args, model_name, start=None):
    from hf_quailora import load_quantized_model

    model, _ = load_quantized_model(model_name, "nf4")
    model = peft_model(model, rank=args.rank, seed=0)
    if start is not None:
        model.load_state_dict(start, strict=False)
    return model


def quailora_start(args, model_name, calibration):
    from hf_quailora import QuAILoRAConfig, quailora_init

    model = fresh_model(args, model_name)
    quailora_init(model, calibration, QuAILoRAConfig(solver="closed_form", calibration_samples=None,
                                                     calibration_length=args.window_length, show_progress=False))
    return {name: value.detach().clone() for name, value in model.state_dict().items() if "lora_" in name}


def build_trainer(args, model, tokenizer, train, held_out, seed, output_dir, exits=None, steps=None,
                  exit_weights=None):
    from transformers import PrinterCallback

    from hf_quailora import DynamicRankConfig, DynamicRankTrainer

    config = DynamicRankConfig(
        output_dir=output_dir, max_steps=steps or args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8, learning_rate=args.learning_rate, lr_scheduler_type="constant",
        max_length=args.max_length, logging_steps=max(1, args.steps // 4), save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=False, seed=seed, dataloader_num_workers=0,
        disable_tqdm=True, soft_ranks=[args.rank], eval_ranks=[args.rank], rank_scaling="constant", soft_exits=exits,
        soft_exit_weights=exit_weights if exits else None,
    )
    trainer = DynamicRankTrainer(model, args=config, train_dataset=train, eval_dataset=held_out,
                                 processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    for param in trainer.model.parameters():  # fp32 adapters in every arm (trl casts them to bf16 on a 4-bit base)
        if param.requires_grad:
            param.data = param.data.float()
    return trainer


def score_exit(trainer, k, windows, rank):
    """Held-out Alpaca loss and Wikipedia perplexity of sub-model k (the first k layers)."""
    from hf_quailora import compute_perplexity, use_exit, use_rank

    exits, trainer.depth_exits = trainer.depth_exits, None  # evaluate() of this one sub-model only
    try:
        with use_exit(trainer.model, k):
            loss = trainer.evaluate()["eval_loss"]
            with use_rank(trainer.model, rank, rank_scaling="constant"):
                perplexity = compute_perplexity(trainer.model, windows, batch_size=4)
    finally:
        trainer.depth_exits = exits
    return {"loss": loss, "perplexity": perplexity}


def tune_exit_norm(trainer, k, steps, learning_rate):
    """SFT+ICT at exit k: everything frozen but the final norm, tuned `steps` steps on exit k's loss (the caller
    restores the norm afterwards, so each exit gets its own copy)."""
    from hf_quailora import use_exit
    from hf_quailora.dynamic_rank.exits import find_depth_path

    norm = find_depth_path(trainer.model).outputs[0]
    flags = {name: p.requires_grad for name, p in trainer.model.named_parameters()}
    for param in trainer.model.parameters():
        param.requires_grad_(False)
    norm.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([norm.weight], lr=learning_rate, weight_decay=0.0)
    batches = iter(trainer.get_train_dataloader())
    trainer.model.train()
    with use_exit(trainer.model, k):
        for _ in range(steps):
            batch = next(batches)
            loss = trainer.model(**{key: batch[key] for key in ("input_ids", "attention_mask", "labels")}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for name, param in trainer.model.named_parameters():
        param.requires_grad_(flags[name])


def run_seed(args, model_name, data, start, seed, exits, work):
    tokenizer, train, held_out, windows, _ = data
    out, arms, exit_weights = {}, parse_arms(args.arms), parse_exit_weights(args.soft_exit_weights)
    for arm, arm_exits in (("soft", exits), ("sft", None)):
        if arm not in arms:
            continue
        started = time.perf_counter()
        trainer = build_trainer(args, fresh_model(args, model_name, start), tokenizer, train, held_out, seed,
                                os.path.join(work, arm), exits=arm_exits, exit_weights=exit_weights)
        trainer.train()
        seconds = time.perf_counter() - started
        out[arm] = {str(k): score_exit(trainer, k, windows, args.rank) for k in exits}
        out[arm]["train_seconds"] = seconds
        out[arm]["score_seconds"] = time.perf_counter() - started - seconds
        print(f"[{model_name} seed {seed}] {arm}: {json.dumps(out[arm])}", file=sys.stderr, flush=True)
    if "ict" not in arms:
        return out
    from hf_quailora.dynamic_rank.exits import find_depth_path

    norm = find_depth_path(trainer.model).outputs[0]
    original = norm.weight.detach().clone()
    out["sft+ict"] = {str(exits[-1]): out["sft"][str(exits[-1])]}  # the full model keeps its own norm
    started = time.perf_counter()
    for k in exits[:-1]:  # the sft adapter stays frozen; only a per-exit copy of the final norm is tuned
        tune_exit_norm(trainer, k, args.steps, args.ict_learning_rate)
        out["sft+ict"][str(k)] = score_exit(trainer, k, windows, args.rank)
        norm.weight.data.copy_(original)
    out["sft+ict"]["seconds"] = time.perf_counter() - started
    print(f"[{model_name} seed {seed}] sft+ict: {json.dumps(out['sft+ict'])}", file=sys.stderr, flush=True)
    return out


def quality(args, model_name, seeds, save=None):
    from hf_quailora import exit_layers
    from hf_quailora.dynamic_rank.exits import find_depth_path

    data = load_data(args, model_name)
    started = time.perf_counter()
    start = quailora_start(args, model_name, data[4])
    init_seconds = time.perf_counter() - started
    model = fresh_model(args, model_name, start)
    exits = exit_layers(EXIT_FRACTIONS, find_depth_path(model).num_layers)
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        tokenizer, train, held_out, windows, _ = data  # the start's own sub-models, before any training
        trainer = build_trainer(args, model, tokenizer, train, held_out, 0, os.path.join(work, "start"), exits=exits)
        start_scores = {str(k): score_exit(trainer, k, windows, args.rank) for k in exits}
        print(f"[{model_name}] start: {json.dumps(start_scores)}", file=sys.stderr, flush=True)
        del model, trainer
        for seed in seeds:
            runs[str(seed)] = run_seed(args, model_name, data, start, seed, exits, os.path.join(work, str(seed)))
            if save is not None:  # each finished seed is kept, should a later one not finish
                save({"exits": exits, "init_seconds": init_seconds, "start": start_scores, "runs": runs})
    return {"exits": exits, "init_seconds": init_seconds, "start": start_scores, "runs": runs}


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def quality_table(model_name, result, soft_exit_weights=None) -> str:
    exits, runs = result["exits"], list(result["runs"].values())
    start = result.get("start", {})  # the QuAILoRA start's sub-models, before training (absent in older runs)
    notes = "".join([f"; SoFT exit weights {soft_exit_weights}" if soft_exit_weights else "",
                     f"; {', '.join(result['baseline_arms'])} from {result['baseline']}" if result.get("baseline_arms")
                     else ""])
    lines = [f"\n#### {model_name}: held-out Alpaca loss / Wikipedia perplexity per exit (mean ± std over "
             f"{len(runs)} seeds{notes})\n", "| exit | start loss | SoFT loss | SFT read-out loss | SFT+ICT loss | start ppl | "
             "SoFT ppl | SFT read-out ppl | SFT+ICT ppl |", "|---|---|---|---|---|---|---|---|---|"]
    for k in exits:
        at = start.get(str(k))
        cells = [f"{at['loss']:.3f}" if at else "–"]
        for metric in ("loss", "perplexity"):
            if metric == "perplexity":
                cells.append(f"{at['perplexity']:.3g}" if at else "–")
            for arm in ("soft", "sft", "sft+ict"):
                if not all(arm in run for run in runs):  # an arm not run (--arms)
                    cells.append("–")
                    continue
                mean, std = _mean_std([run[arm][str(k)][metric] for run in runs])
                cells.append(f"{mean:.3f} ± {std:.3f}" if metric == "loss" else f"{mean:.3g} ± {std:.2g}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe(args, kind):
    """One fresh process: median step time and peak RSS of training only (VmHWM reset after loading)."""
    import gc

    from transformers import TrainerCallback

    from hf_quailora import exit_layers
    from hf_quailora.dynamic_rank.exits import find_depth_path

    class Timer(TrainerCallback):  # wall and process CPU time (one thread: robust to other work on the machine)
        times, cpu_times, begun = [], [], None

        def on_step_begin(self, *a, **k):
            self.begun = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.begun[0])
            self.cpu_times.append(time.process_time() - self.begun[1])

    if kind == "soft-checkpoint":  # the exit heads recomputed in backward instead of the fused head
        from hf_quailora.dynamic_rank import exit_loss

        exit_loss.FUSED_HEAD = False
    model_name = args.models
    tokenizer, train, held_out, _, _ = load_data(args, model_name)
    model = fresh_model(args, model_name)
    exits = exit_layers(EXIT_FRACTIONS, find_depth_path(model).num_layers) if kind != "plain" else None
    with tempfile.TemporaryDirectory() as work:
        trainer = build_trainer(args, model, tokenizer, train, held_out, 0, work, exits=exits,
                                steps=args.timing_steps + 1)
        timer = Timer()
        trainer.add_callback(timer)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        trainer.train()
        with open("/proc/self/status") as handle:
            peak = next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM:"))
    print(json.dumps({"step_seconds": statistics.median(timer.times[1:]), "peak_rss_mib": peak, "exits": exits,
                      "step_cpu_seconds": statistics.median(timer.cpu_times[1:])}))


def cost(args, model_name):
    out = {}
    for kind in ("plain", "soft", "soft-checkpoint"):
        command = [sys.executable, os.path.abspath(__file__), "--probe", kind, "--models", model_name,
                   "--threads", str(args.threads), "--timing-steps", str(args.timing_steps), "--batch-size",
                   str(args.batch_size), "--max-length", str(args.max_length), "--rank", str(args.rank)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def cost_table(costs) -> str:
    lines = ["\n#### Cost of a 4-exit SoFT step against a plain step (fresh process each)\n",
             "| model | exit head | plain step CPU s | SoFT step CPU s | CPU-time ratio | wall-time ratio | plain peak RSS "
             "MiB | SoFT peak RSS MiB | RSS ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for model_name, c in costs.items():
        p = c["plain"]
        for kind, head in (("soft", "fused"), ("soft-checkpoint", "checkpointed")):
            if kind not in c:
                continue
            s = c[kind]
            cpu = p.get("step_cpu_seconds"), s.get("step_cpu_seconds")
            cpu_cells = f"{cpu[0]:.2f} | {cpu[1]:.2f} | {cpu[1] / cpu[0]:.2f}×" if None not in cpu else "– | – | –"
            lines.append(f"| {model_name} | {head} | {cpu_cells} | {s['step_seconds'] / p['step_seconds']:.2f}× | "
                         f"{p['peak_rss_mib']:.0f} | "
                         f"{s['peak_rss_mib']:.0f} | {s['peak_rss_mib'] / p['peak_rss_mib']:.2f}× |")
    return "\n".join(lines)


def report(paths, baseline=None) -> None:
    tables, costs = {}, {}
    if baseline is not None:
        with open(baseline) as handle:
            baseline_record = json.load(handle)
    for path in paths:
        with open(path) as handle:
            record = json.load(handle)
        print(f"{path}: {json.dumps(record['settings'])}")
        if baseline is not None:
            record = merge_baseline(record, baseline_record, baseline)
        weights = record["settings"].get("soft_exit_weights")
        for model_name, result in record["quality"].items():  # one table per model and SoFT weighting
            tables[model_name, weights] = (model_name, result, weights)
        costs.update(record["cost"])
    for table in tables.values():
        print(quality_table(*table))
    if costs:
        print(cost_table(costs))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        return probe(args, args.probe)
    if args.report:
        return report(args.report, args.baseline)
    parse_arms(args.arms), parse_exit_weights(args.soft_exit_weights)  # bad input fails before any model loads
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results = {"settings": vars(args), "quality": {}, "cost": {}}
    for model_name in models:
        if not args.skip_cost:
            results["cost"][model_name] = cost(args, model_name)
            write_json(args.output, results)
        if not args.skip_quality:
            def save(partial, model_name=model_name):
                results["quality"][model_name] = partial
                write_json(args.output, results)

            results["quality"][model_name] = quality(args, model_name, seeds, save)
            write_json(args.output, results)
    print(f"Settings: {json.dumps(vars(args))}")
    for model_name, result in results["quality"].items():
        print(quality_table(model_name, result))
    if results["cost"]:
        print(cost_table(results["cost"]))


if __name__ == "__main__":
    main()
