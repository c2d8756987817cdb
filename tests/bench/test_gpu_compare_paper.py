"""bench/gpu_compare_paper.sh (issue 36, item 5): its dry run prints compare_init commands that parse and pass every
check made before a model loads, cover the paper's grid, and give QuAILoRA the rate the stored rule measurements pick."""

import json
import os
import shlex
import subprocess

from hf_quailora.quailora.first_step import DEFAULT_BUDGET


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rule_scale(model: str, rank: int) -> float:
    """The factor the rule picks (`bench_lr_rule.pick`) on every train batch set of the stored `bench_lr_rule.py` run."""
    from bench.bench_lr_rule import pick

    name = f"lr_rule-{model}" + ("" if rank == 64 else f"-r{rank}") + ".json"
    with open(os.path.join(ROOT, "bench", "results", name)) as f:
        picks = {pick(row["ratios"], DEFAULT_BUDGET) for row in json.load(f)["rows"]}
    assert len(picks) == 1, (model, rank, picks)  # the sets agree (6 of 6, bench/RESULTS.md)
    return picks.pop()


def test_dry_run_commands_parse_and_cover_the_grid(tmp_path):
    from bench.compare_init.__main__ import make_parser
    from bench.compare_init.arms import check_arguments

    done = subprocess.run(["bash", "bench/gpu_compare_paper.sh", str(tmp_path / "out")], cwd=ROOT, timeout=60,
                          env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line[2:]) for line in done.stderr.splitlines() if line.startswith("+ ")]
    runs = [c[c.index("-m") + 2:] for c in commands if "bench.compare_init" in c and "--summary_only" not in c]
    assert len(runs) == 12 and any("--summary_only" in c for c in commands)
    grid = set()
    for argv in runs:
        (args,) = make_parser().parse_args_into_dataclasses(args=argv)
        plan = check_arguments(args)
        assert args.steps == 200 and args.calibration_data == "alpaca_train" and args.learning_rate == 2e-4
        assert sorted(plan.arms) == ["int8", "qlora", "quailora" if args.quailora_lr_scale is None
                                     else f"quailora@lr{args.quailora_lr_scale}"]
        (model,), (rank,), (seed,) = plan.models, plan.ranks, plan.seeds
        scale = float(args.quailora_lr_scale) if args.quailora_lr_scale is not None else 1.0
        assert scale == rule_scale(model, rank), (model, rank, scale)
        grid.add((model, rank, seed))
    assert grid == {(m, r, s) for m in ("smollm2-135m", "gemma3-270m") for r in (16, 64) for s in (1, 2, 3)}
    assert not (tmp_path / "out" / "runs").exists()  # the dry run ran nothing


def test_bad_arguments_fail_before_anything_runs(tmp_path):
    for argv, message in (([], "usage"), ([str(tmp_path / "out"), "ten"], "SECONDS")):
        done = subprocess.run(["bash", "bench/gpu_compare_paper.sh", *argv], cwd=ROOT, timeout=60,
                              env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True)
        assert done.returncode != 0 and message in done.stderr and "+ " not in done.stderr
