"""`hf-quailora` command line: benchmark every rank of a dynamic-rank adapter, export one rank, or run lm-eval's own
command line with the `hf-dynrank` model and the offline tasks.

    hf-quailora eval --model smollm2-135m --adapter outputs/alpaca/adapter --ranks 1,2,4,8,16 \\
        --tasks quailora_wiki_ppl,quailora_alpaca_loss --limit 50 --output_dir outputs/rank_sweep
    hf-quailora export --model smollm2-135m --adapter outputs/alpaca/adapter --rank 4 --output_dir adapter-r4
    hf-quailora export --merged --dtype bfloat16 --adapter outputs/alpaca/adapter --rank 4 --output_dir merged-r4
    hf-quailora lm-eval --model hf-dynrank --model_args pretrained=smollm2-135m,peft=outputs/alpaca/adapter,rank=4 \\
        --tasks quailora_wiki_ppl --limit 20

`hf-quailora <command> --help` explains every option.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .dynamic_rank.merge import MERGED_DTYPES
from .dynamic_rank.spec import RANK_SCALINGS
from .embedded.models import DEFAULT_MODEL
from .quantization import QUANTIZATIONS


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="base model: embedded name (e.g. %(default)s), local folder or Hub id (default: %(default)s)")
    parser.add_argument("--adapter", required=True, help="folder of the saved (full-rank) dynamic-rank LoRA adapter")
    parser.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                        help="load the base quantized by bitsandbytes (default: what dynamic_rank.json records the "
                        "adapter was trained on, else none)")
    parser.add_argument("--rank_scaling", default=None, choices=list(RANK_SCALINGS),
                        help="scaling the adapter was trained with (default: read from dynamic_rank.json, else per_rank)")
    parser.add_argument("--allow_other_base", action="store_true",
                        help="load a QuAILoRA adapter on a base quantized otherwise than dynamic_rank.json records "
                        "(refused without it: on the full-precision base its correction is applied twice)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-quailora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="lm-eval benchmarks of every rank of one adapter",
                                   description="Run lm-evaluation-harness tasks at each rank of one dynamic-rank "
                                   "adapter (the model is loaded once) and write results.json, results.md and "
                                   "results.png.")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--ranks", required=True, help="comma-separated ranks, e.g. 1,2,4,8")
    evaluate.add_argument("--exits", default=None,
                          help="SoFT by depth: comma-separated exits (layer counts), each rank evaluated at each")
    evaluate.add_argument("--tasks", default="quailora_wiki_ppl",
                          help="comma-separated lm-eval tasks; offline: quailora_wiki_ppl, quailora_alpaca_loss, "
                          "quailora_alpaca_mc, quailora_wiki_cloze; others need the Hub or --include_path (default: %(default)s)")
    evaluate.add_argument("--include_path", action="append", default=None, help="folder of extra task YAMLs (repeatable)")
    evaluate.add_argument("--output_dir", required=True, help="where results.json/.md/.png are written")
    evaluate.add_argument("--overwrite", action="store_true", help="replace results already in --output_dir")
    evaluate.add_argument("--limit", type=float, default=None, help="documents per task (int) or fraction (<1)")
    evaluate.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per prompt")
    evaluate.add_argument("--batch_size", type=int, default=8, help="lm-eval batch size (default: %(default)s)")
    evaluate.add_argument("--max_length", type=int, default=None, help="lm-eval context length (default: the model's)")
    evaluate.add_argument("--apply_chat_template", action="store_true", help="format prompts with the chat template")
    evaluate.add_argument("--no_base_baseline", action="store_true",
                          help="skip the base model (adapter disabled) baseline row")

    export = commands.add_parser("export", help="save one rank as an ordinary peft adapter, or merged into the base",
                                 description="Export rank b of a dynamic-rank adapter as a plain peft LoRA adapter "
                                 "(r=b, lora_alpha set so peft's scaling equals the trained one), or with --merged "
                                 "as a plain transformers model: Q + s*B*A in every quantized LoRA layer (Q: the "
                                 "dequantized weight the adapter was trained on), for serving without peft.")
    _add_model_arguments(export)
    export.add_argument("--rank", type=int, required=True, help="the rank b to export")
    export.add_argument("--exit", type=int, default=None,
                        help="SoFT by depth: keep only the layers below this exit (load on a base with that many); "
                             "with --merged, a model of that many layers")
    export.add_argument("--output_dir", required=True,
                        help="folder for adapter_config.json and the weights (never the --adapter folder)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace another adapter in --output_dir (an earlier export is replaced without it)")
    export.add_argument("--merged", action="store_true",
                        help="write a standard transformers model folder: the adapter at --rank merged into the "
                        "dequantized base it was trained on (never into the full-precision weights)")
    export.add_argument("--dtype", default=None, choices=list(MERGED_DTYPES),
                        help="dtype of the --merged weights (default: bfloat16)")

    # Listed for --help only: main() hands everything after `init` / `lm-eval` to their own parsers, untouched.
    commands.add_parser("init", add_help=False, help="write a QuAILoRA start as a peft adapter folder "
                        "(`hf-quailora init --help`: the recipes' model, LoRA and calibration flags)")
    commands.add_parser("lm-eval", add_help=False, help="lm-eval's own command line, with hf-dynrank and the "
                        "offline tasks (`hf-quailora lm-eval --help` shows lm-eval's options)")
    return parser


def _read_adapter(args):
    """The adapter folder, read and checked before any model loads, with the ranks it was trained at."""
    from .dynamic_rank.saved_adapter import read_saved_adapter
    from .dynamic_rank.truncation import TrainedRanks

    saved = read_saved_adapter(args.adapter)
    return saved, TrainedRanks.from_saved(saved)


def _check_exits(args, exits: dict) -> None:
    """`--exits` / `--exit` against the base's depth, from its config alone, before any weight loads."""
    if any(value is not None for value in exits.values()):
        from transformers import AutoConfig

        from .dynamic_rank.exits import check_exits_against_config
        from .embedded.models import resolve

        check_exits_against_config(AutoConfig.from_pretrained(resolve(args.model)), exits)


def _load(args, saved):
    from .dynamic_rank.export import load_dynamic_rank_adapter

    return load_dynamic_rank_adapter(args.model, saved, args.quantization, args.rank_scaling,
                                     allow_other_base=args.allow_other_base)


def _evaluate(args) -> None:
    from .dynamic_rank.spec import parse_ranks
    from .evaluation.lm_eval_bridge import check_lm_eval_options, check_output_dir, evaluate_ranks, resolve_tasks
    from .evaluation.reporting import rows_to_markdown

    # Everything that can be checked without the model, first.
    ranks = parse_ranks(args.ranks)
    exits = parse_ranks(args.exits) if args.exits is not None else None  # layer counts, checked against the model
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    check_lm_eval_options(limit, args.batch_size, args.max_length, args.num_fewshot)
    check_output_dir(args.output_dir, args.overwrite)
    saved, trained = _read_adapter(args)
    if saved.metadata is not None:  # a plain adapter is evaluated at its own rank only (below)
        trained.check(ranks, "--ranks")
    resolve_tasks(args.tasks, args.include_path)  # seconds (lm-eval indexes its tasks), still before the model
    _check_exits(args, {"--exits": exits})
    loaded = _load(args, saved)
    if loaded.metadata is None and ranks != [loaded.max_rank]:
        logging.getLogger("hf_quailora").warning("Evaluating only rank %d (the adapter's own).", loaded.max_rank)
        ranks = [loaded.max_rank]
    rows = evaluate_ranks(
        loaded.model, loaded.tokenizer, ranks, args.tasks, include_path=args.include_path,
        output_dir=args.output_dir, overwrite=args.overwrite,
        baselines=None if args.no_base_baseline else {"base model": "no_adapter"}, rank_scaling=loaded.rank_scaling,
        limit=limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, max_length=args.max_length,
        apply_chat_template=args.apply_chat_template, exits=exits,
    )
    print(rows_to_markdown(rows))
    print(f"Results written to {args.output_dir}/results.json, results.md, results.png")


def _export_merged(args) -> None:
    import contextlib

    from .dynamic_rank.exits import use_exit
    from .dynamic_rank.merge import check_merged_dir, export_merged

    if args.overwrite:
        raise SystemExit("hf-quailora export: --overwrite is not used with --merged: a merged model is written into a "
                         "new or empty folder only.")
    check_merged_dir(args.output_dir, source_dir=args.adapter)
    saved, trained = _read_adapter(args)
    trained.check([args.rank], "--rank")
    loaded = _load(args, saved)
    # --exit: merged under use_exit, the model holds only its first k layers (and a config of k layers)
    with use_exit(loaded.model, args.exit) if args.exit is not None else contextlib.nullcontext():
        path = export_merged(loaded.model, args.rank, args.output_dir, dtype=args.dtype or "bfloat16",
                             rank_scaling=loaded.rank_scaling, tokenizer=loaded.tokenizer)
    at_exit = f" (its first {args.exit} layers)" if args.exit is not None else ""
    print(f"Rank {args.rank} merged into the dequantized base{at_exit}, written as a transformers model to {path}")


def _export(args) -> None:
    from .dynamic_rank.export import check_export_dir, export_rank

    if args.merged:
        _check_exits(args, {"--exit": None if args.exit is None else [args.exit]})
        return _export_merged(args)
    if args.dtype is not None:
        raise SystemExit("hf-quailora export: --dtype is only used with --merged (an adapter keeps its own dtype).")
    check_export_dir(args.output_dir, args.overwrite, source_dir=args.adapter)
    saved, trained = _read_adapter(args)
    trained.check([args.rank], "--rank")
    _check_exits(args, {"--exit": None if args.exit is None else [args.exit]})
    loaded = _load(args, saved)
    path = export_rank(loaded.model, args.rank, args.output_dir, rank_scaling=loaded.rank_scaling,
                       overwrite=args.overwrite, exit=args.exit)
    at_exit = f" (layers below {args.exit}: load on a base with num_hidden_layers={args.exit})" if args.exit else ""
    print(f"Rank {args.rank} exported as a plain peft adapter to {path}{at_exit}")


def main(argv: list[str] | None = None) -> int:
    from .quantization import quiet_bnb_warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_bnb_warnings()
    if argv[:1] == ["init"]:
        from .scripts.init_adapter import main as init_main

        return init_main(argv[1:])
    if argv[:1] == ["lm-eval"]:
        from .evaluation.lm_eval_cli import run_lm_eval_cli

        return run_lm_eval_cli(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = make_parser().parse_args(argv)
    _evaluate(args) if args.command == "eval" else _export(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
