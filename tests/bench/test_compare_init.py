"""bench/compare_init end to end (`python -m bench.compare_init` through runpy, patched sys.argv) on the tiny Llama,
and its input checks."""

import json
import math
import os
import runpy
import sys

import pytest

from testing_utils import REPO_ROOT, require_bitsandbytes


ALL_ARMS = ["qlora", "svd", "quailora", "int8", "fp32", "dynamic"]


def write_small_data(folder, texts):
    alpaca = folder / "alpaca.json"
    rows = [{"instruction": f"Repeat sentence {i}.", "input": "", "output": texts[i % len(texts)]} for i in range(12)]
    alpaca.write_text(json.dumps(rows))
    text = folder / "text.txt"
    text.write_text("\n".join(texts))
    return str(alpaca), str(text)


def run_recipe(monkeypatch, argv):
    """`python -m bench.compare_init *argv` from the repository root, in this process."""
    monkeypatch.syspath_prepend(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["compare_init", *argv])
    runpy.run_module("bench.compare_init", run_name="__main__")


@require_bitsandbytes
def test_compare_init_runs_every_arm_and_writes_its_report(tiny_model_path, tiny_texts, tmp_path, monkeypatch, capsys):
    alpaca, text = write_small_data(tmp_path, tiny_texts)
    # the held-out text under another name: calibrated on in-sample on purpose (the same name would calibrate on the
    # windows after the held-out ones), so that the tiny random model's QuAILoRA start is closer to fp32 below
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(open(text).read())
    out = tmp_path / "out"
    run_recipe(monkeypatch, [
        "--model_name_or_path", tiny_model_path, "--arms", ",".join(ALL_ARMS), "--steps", "2", "--eval_steps", "1",
        "--rank", "4", "--dynamic_eval_ranks", "1,2,4", "--batch_size", "2", "--max_length", "256",
        "--train_data", alpaca, "--holdout_examples", "4", "--eval_examples", "3",
        "--perplexity_data", text, "--calibration_data", str(calibration),
        "--eval_windows", "2", "--window_length", "32", "--calibration_windows", "2", "--threads", "1",
        "--learning_rate", "1e-2", "--output_dir", str(out),
    ])
    printed = capsys.readouterr().out
    for name in ("results.md", "results.json", "convergence.png"):
        assert (out / name).is_file(), name
        assert name in printed
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "convergence.png") as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100

    saved = json.loads((out / "results.json").read_text())
    arms = {record["arm"]: record["result"] for record in saved["arms"]}
    assert sorted(arms) == sorted(ALL_ARMS)
    for arm in ALL_ARMS:  # one JSON per finished arm, for resuming
        assert (out / "runs" / os.path.basename(tiny_model_path) / "r4" / "seed42" / f"{arm}.json").is_file(), arm
    for arm, result in arms.items():
        for key in ("perplexity_start", "perplexity_end", "eval_loss_start", "eval_loss_end", "train_seconds"):
            assert math.isfinite(result[key]), (arm, key, result[key])
        assert [entry["step"] for entry in result["history"]] == [0, 1, 2], arm
    # Independent references computed in this run: B = 0 arms on the same NF4 base start from the same model,
    # and QuAILoRA's calibrated start is closer to fp32 than the B = 0 start.
    assert arms["qlora"]["perplexity_start"] == pytest.approx(arms["qlora"]["history"][0]["perplexity"])
    assert arms["dynamic"]["per_rank"]["start"]["4"]["perplexity"] == pytest.approx(
        arms["quailora"]["perplexity_start"], rel=1e-4)
    gap_to_fp32 = {arm: abs(arms[arm]["perplexity_start"] - arms["fp32"]["perplexity_start"]) for arm in arms}
    assert gap_to_fp32["quailora"] < gap_to_fp32["qlora"], gap_to_fp32
    assert set(arms["dynamic"]["per_rank"]["end"]) == {"1", "2", "4"}

    table = (out / "results.md").read_text()
    assert "python -m bench.compare_init --model_name_or_path" in table  # the command that produced the arms
    for label in ("QLoRA (NF4, B = 0)", "SVD start", "QuAILoRA (NF4", "LLM.int8", "fp32 base", "dynamic rank"):
        assert label in table, label
    rows = [line for line in table.splitlines()
            if line.startswith("| ") and "start |" not in line and "last interval" not in line]  # no headers
    # arms + QuAILoRA-by-rank row + convergence row per arm + gap-closed row per arm but qlora and int8
    # + per-rank rows of the dynamic arm + the decomposition's two metrics per arm but qlora and int8
    assert len(rows) == len(ALL_ARMS) + 1 + len(ALL_ARMS) + len(ALL_ARMS) - 2 + 3 + 2 * (len(ALL_ARMS) - 2)
    assert "| to QLoRA catching up |" in table
    assert "nan" not in table.lower() and "inf" not in table.lower()


def tiny_argv(model, alpaca, text, out, *extra):
    return [
        "--model_name_or_path", model, "--steps", "2", "--eval_steps", "2", "--batch_size", "2", "--max_length", "256",
        "--train_data", alpaca, "--holdout_examples", "4", "--eval_examples", "2", "--perplexity_data", text,
        "--calibration_data", text, "--eval_windows", "2", "--window_length", "32", "--calibration_windows", "2",
        "--learning_rate", "1e-2", "--curve_eval_examples", "1", "--output_dir", str(out), *extra,
    ]


@require_bitsandbytes
def test_compare_init_resumes_per_arm_over_seeds_and_ranks(tiny_model_path, tiny_texts, tmp_path, monkeypatch):
    import bench.compare_init.run as run_module

    alpaca, text = write_small_data(tmp_path, tiny_texts)
    out = tmp_path / "out"
    argv = tiny_argv(tiny_model_path, alpaca, text, out, "--arms", "qlora,int8", "--seeds", "1,2", "--ranks", "2,4")
    run_recipe(monkeypatch, argv)
    runs = out / "runs" / os.path.basename(tiny_model_path)
    finished = sorted(runs.glob("r*/seed*/*.json"))
    assert len(finished) == 2 * 2 * 2
    stamps = {path: path.stat().st_mtime_ns for path in finished}
    # different seeds give different LoRA A, hence different training
    seeds = [json.loads((runs / "r4" / f"seed{s}" / "qlora.json").read_text())["result"] for s in (1, 2)]
    assert seeds[0]["perplexity_end"] != seeds[1]["perplexity_end"]
    # --curve_eval_examples 1: the start and the end are scored on both examples, the curve on the last one
    history = seeds[0]["history"]
    assert [(entry["step"], entry["alpaca_examples"]) for entry in history] == [(0, 2), (0, 1), (2, 1), (2, 2)]
    assert seeds[0]["eval_loss_start"] == history[0]["eval_loss"]
    assert seeds[0]["eval_loss_end"] == history[3]["eval_loss"]
    assert history[0]["eval_loss"] != history[1]["eval_loss"] and history[2]["perplexity"] == history[3]["perplexity"]
    # the start does not depend on the seed (B = 0: nor on the rank): evaluated once, then reused
    first = json.loads((runs / "r2" / "seed1" / "qlora.json").read_text())["result"]["history"]
    assert not first[0].get("start_reused") and seeds[0]["history"][0]["start_reused"]
    assert seeds[1]["history"][0]["start_reused"] and seeds[1]["perplexity_start"] == first[0]["perplexity"]

    # A second invocation with one more arm runs only that arm; the finished ones are skipped, not rewritten.
    calls = []
    original = run_module.run_arm
    monkeypatch.setattr(run_module, "run_arm", lambda arm, *rest: calls.append(arm) or original(arm, *rest))
    run_recipe(monkeypatch, argv[:-6] + ["--arms", "qlora,int8,quailora", "--seeds", "1,2", "--ranks", "2,4"])
    assert calls == ["quailora"] * 4
    starts = [json.loads((runs / f"r{r}" / f"seed{s}" / "quailora.json").read_text())["result"]["history"][0]
              for r in (2, 4) for s in (1, 2)]
    assert [bool(entry.get("start_reused")) for entry in starts] == [False, True, False, True]
    assert starts[0]["perplexity"] == starts[1]["perplexity"] and starts[2]["perplexity"] == starts[3]["perplexity"]
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    saved = json.loads((out / "results.json").read_text())
    assert {(entry["rank"], tuple(entry["seeds"])) for entry in saved["summary"]} == {(2, (1, 2)), (4, (1, 2))}
    assert all(set(entry["arms"]) == {"qlora", "quailora", "int8"} for entry in saved["summary"])

    # --summary_only trains nothing; other settings in the same folder are refused before anything loads
    calls.clear()
    run_recipe(monkeypatch, ["--summary_only", "--output_dir", str(out)])
    assert calls == []
    with pytest.raises(ValueError, match="other settings"):
        run_recipe(monkeypatch, tiny_argv(tiny_model_path, alpaca, text, out, "--arms", "qlora", "--steps", "3"))
    assert calls == []


def test_compare_init_summary_math_and_plot(tmp_path):
    """mean ± std over seeds of perplexity and gap closed, checked against numpy on made-up finished arms."""
    import numpy as np

    from bench.compare_init.summary import gap_bands, plot_summary, summarize, summary_markdown

    rng = np.random.default_rng(0)
    records, values = [], {}
    for seed in (1, 2, 3):
        for arm, base in (("qlora", 30.0), ("quailora", 27.0), ("int8", 25.0)):
            ppl = base + rng.normal(size=2)  # start, end
            values[(seed, arm)] = ppl
            history = [{"step": 0, "perplexity": ppl[0], "eval_loss": 1.0}, {"step": 5, "perplexity": ppl[1],
                                                                              "eval_loss": 0.9 + 0.01 * seed}]
            result = {"perplexity_start": ppl[0], "perplexity_end": ppl[1], "eval_loss_start": 1.0,
                      "eval_loss_end": 0.9 + 0.01 * seed, "seconds": 10.0, "history": history}
            records.append({"model": "m", "rank": 8, "seed": seed, "arm": arm, "result": result})
    (entry,) = summarize(records)
    for index, when in enumerate(("start", "end")):
        ppl = np.array([values[(seed, "quailora")][index] for seed in (1, 2, 3)])
        stats = entry["arms"]["quailora"][f"perplexity_{when}"]
        assert stats["mean"] == pytest.approx(ppl.mean()) and stats["std"] == pytest.approx(ppl.std(ddof=1))
        gaps = np.array([(values[(s, "qlora")][index] - values[(s, "quailora")][index])
                         / (values[(s, "qlora")][index] - values[(s, "int8")][index]) for s in (1, 2, 3)])
        stats = entry["arms"]["quailora"][f"gap_{when}"]
        assert stats["mean"] == pytest.approx(gaps.mean()) and stats["std"] == pytest.approx(gaps.std(ddof=1))
        assert entry["arms"]["int8"][f"gap_{when}"]["mean"] == pytest.approx(1.0)
    loss = entry["arms"]["qlora"]["eval_loss_end"]
    assert loss["mean"] == pytest.approx(0.92) and loss["std"] == pytest.approx(0.01)
    meta = dict(steps=5, batch_size=2, learning_rate=1e-4, lr_scheduler_type="constant", max_length=64,
                target_modules="all-linear", adapter_dtype="float32", eval_windows=2, window_length=32,
                perplexity_data="wiki", eval_examples=2, holdout_examples=4)
    table = summary_markdown([entry], records, meta)
    assert f"{entry['arms']['quailora']['gap_end']['mean']:.1%} ± " in table
    qlora_ppl = np.mean([values[(seed, "qlora")] for seed in (1, 2, 3)], axis=0)  # the convergence table's row
    assert f"| {qlora_ppl[0]:.2f} / 1.000 | {qlora_ppl[1]:.2f} / 0.920 | – / – |" in table
    mean_ppl = {arm: np.mean([values[(seed, arm)] for seed in (1, 2, 3)], axis=0) for arm in ("quailora", "int8")}
    step_gaps = (qlora_ppl - mean_ppl["quailora"]) / (qlora_ppl - mean_ppl["int8"])  # the loss gap is 0 / 0 here
    row = f"| gap closed: QuAILoRA (NF4, closed form) | {step_gaps[0]:.1%} / – | {step_gaps[1]:.1%} / – | – |"
    assert row in table
    assert "gap closed: QLoRA" not in table and "gap closed: LLM.int8" not in table
    steps, mean, std = gap_bands(records, "m", 8, "quailora")  # per seed and step, then mean ± std
    per_seed = [(values[(s, "qlora")] - values[(s, "quailora")]) / (values[(s, "qlora")] - values[(s, "int8")])
                for s in (1, 2, 3)]
    assert steps == [0, 5] and mean == pytest.approx(np.mean(per_seed, axis=0))
    assert std == pytest.approx(np.std(per_seed, axis=0, ddof=1))
    assert gap_bands(records, "m", 8, "svd") == ([], [], [])  # no such arm
    assert gap_bands([r for r in records if r["arm"] != "int8"], "m", 8, "quailora") == ([], [], [])
    path = plot_summary(records, [entry], str(tmp_path / "bands.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as image:  # three panels: perplexity, Alpaca loss and the gap closed
        assert image.size == (round(3 * 5.5 * 110), round(3.6 * 110))
    without_int8 = [record for record in records if record["arm"] != "int8"]
    path = plot_summary(without_int8, summarize(without_int8), str(tmp_path / "no_gap.png"))
    with Image.open(path) as image:  # no gap to plot: two panels
        assert image.size == (round(2 * 5.5 * 110), round(3.6 * 110))


def test_alpaca_validation_perplexity_gap_is_the_gap_of_exp_loss():
    """The paper's metric: the gap closed in exp(Alpaca loss), per seed, beside the gap in the loss itself."""
    import math

    from bench.compare_init.summary import summarize, summary_markdown

    losses = {1: {"qlora": 1.60, "quailora": 1.52, "int8": 1.50}, 2: {"qlora": 1.62, "quailora": 1.55, "int8": 1.50}}
    records = [{"model": "m", "rank": 8, "seed": seed, "arm": arm,
                "result": {"perplexity_start": 30.0, "perplexity_end": 29.0, "eval_loss_start": 1.7,
                           "eval_loss_end": loss, "seconds": 1.0, "history": []}}
               for seed, arms in losses.items() for arm, loss in arms.items()]
    (entry,) = summarize(records)
    stats = entry["arms"]["quailora"]
    ppl = [{arm: math.exp(loss) for arm, loss in arms.items()} for arms in losses.values()]
    by_seed = [(p["qlora"] - p["quailora"]) / (p["qlora"] - p["int8"]) for p in ppl]
    assert stats["alpaca_ppl_gap_end"]["mean"] == pytest.approx(sum(by_seed) / 2)
    assert by_seed[0] == pytest.approx(0.8079, abs=1e-4)  # 0.8 in the loss
    assert stats["alpaca_ppl_gap_end"]["mean"] > stats["loss_gap_end"]["mean"] == pytest.approx((0.8 + 7 / 12) / 2)
    assert stats["alpaca_ppl_gap_start"]["mean"] is None  # every arm starts at the same loss: 0 / 0
    meta = dict(steps=5, batch_size=2, learning_rate=1e-4, lr_scheduler_type="constant", max_length=64,
                target_modules="all-linear", adapter_dtype="float32", eval_windows=2, window_length=32,
                perplexity_data="wiki", eval_examples=2, holdout_examples=4)
    table = summary_markdown([entry], records, meta)
    cell = f"{stats['alpaca_ppl_gap_end']['mean']:.1%} ± {stats['alpaca_ppl_gap_end']['std']:.1%}"
    assert table.count(cell) == 2  # the arm's table and the rank-trend table


def test_dynamic_rank_table_sets_each_truncated_rank_beside_the_fixed_rank_arms():
    """Per truncated rank: the dynamic arm's mean ± std over seeds, and the fixed-rank runs at that rank with the
    same seeds (a partial set is marked; none gives –)."""
    from bench.compare_init.summary import _dynamic_ranks

    def per_rank(offset):
        return {when: {b: {"perplexity": 30.0 - int(b) - offset - (when == "end"), "eval_loss": 1.0}
                       for b in ("2", "8")} for when in ("start", "end")}

    records = [{"model": "m", "rank": 8, "seed": seed, "arm": "dynamic", "result": {"per_rank": per_rank(seed)}}
               for seed in (1, 2)]
    records += [{"model": "m", "rank": 8, "seed": seed, "arm": "quailora", "result": {"perplexity_end": 20.0 + seed}}
                for seed in (1, 2, 3)]  # seed 3 has no dynamic run: not averaged in
    records.append({"model": "m", "rank": 2, "seed": 1, "arm": "qlora", "result": {"perplexity_end": 25.0}})
    records.append({"model": "other", "rank": 8, "seed": 1, "arm": "quailora", "result": {"perplexity_end": 1.0}})
    lines = _dynamic_ranks(records)
    # rank 8: dynamic ends 20.0 (seed 1) and 19.0 (seed 2); QuAILoRA r = 8 seeds 1, 2: 21, 22; no QLoRA at r = 8
    assert "| m | 8 | 8 | 2 | 20.500 ± 0.707 | 19.500 ± 0.707 | 21.500 ± 0.707 | – |" in lines
    # rank 2: no QuAILoRA at r = 2; QLoRA at r = 2 ran seed 1 only
    assert "| m | 8 | 2 | 2 | 26.500 ± 0.707 | 25.500 ± 0.707 | – | 25.000 (1 of 2 seeds) |" in lines
    assert _dynamic_ranks([r for r in records if r["arm"] != "dynamic"]) == []


def test_last_interval_share_reads_flat_and_falling_curves():
    from bench.compare_init.summary import last_interval_share

    assert last_interval_share([2.0, 1.5, 1.25, 1.25]) == 0.0  # flat at the end
    assert last_interval_share([4.0, 3.0, 2.0, 1.0]) == pytest.approx(1 / 3)  # still falling at a constant rate
    assert last_interval_share([2.0, 1.0, 1.5]) == pytest.approx(-1.0)  # rising again: negative
    assert last_interval_share([1.0, 2.0]) is None and last_interval_share([1.0, 0.5, 1.0]) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arms", "qlora,magic"], "unknown arms"),
        (["--arms", "qlora,qlora"], "repeats"),
        (["--steps", "0"], "--steps"),
        (["--rank", "0"], "--rank"),
        (["--eval_steps", "0"], "--eval_steps"),
        (["--eval_windows", "0"], "--eval_windows"),
        (["--learning_rate", "-1"], "learning_rate"),
        (["--eval_examples", "300"], "holdout_examples"),
        (["--arms", "dynamic", "--rank", "8", "--dynamic_eval_ranks", "1,16"], "dynamic_eval_ranks"),
        (["--arms", "dynamic", "--dynamic_eval_ranks", "one"], "dynamic_eval_ranks"),
        (["--seeds", ""], "--seeds"),
        (["--seeds", "1,x"], "--seeds"),
        (["--ranks", "16,0"], "--ranks"),
        (["--ranks", "16,16"], "repeats"),
        (["--models", "smollm2-135m,no-such-model"], "Unknown model"),
        (["--models", " , "], "--models"),
        (["--eval_batch_size", "0"], "--eval_batch_size"),
        (["--curve_eval_examples", "201"], "--curve_eval_examples"),
        ([], "Unknown model"),
        (["--summary_only"], "no finished arm"),
    ],
)
def test_compare_init_rejects_bad_arguments_before_loading(monkeypatch, tmp_path, argv, message):
    # A model path that does not exist: the checks must fail before anything is loaded.
    with pytest.raises(ValueError, match=message):
        run_recipe(
            monkeypatch, ["--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path), *argv]
        )
    assert not (tmp_path / "results.md").exists()


def test_compare_init_rejects_too_little_data(tiny_model_path, tiny_texts, monkeypatch, tmp_path):
    alpaca, _ = write_small_data(tmp_path, tiny_texts)
    with pytest.raises(ValueError, match="too few"):
        run_recipe(monkeypatch, ["--model_name_or_path", tiny_model_path, "--train_data", alpaca, "--holdout_examples",
                                 "12", "--eval_examples", "4", "--output_dir", str(tmp_path / "out")])


def test_compare_init_rejects_unknown_choice(monkeypatch, tmp_path):
    with pytest.raises(SystemExit):  # argparse `choices`
        run_recipe(monkeypatch, ["--dynamic_update_rule", "sometimes", "--output_dir", str(tmp_path)])


def test_compare_init_shares_uncalibrated_arms_across_calibration_sources():
    """QLoRA and int8 do not calibrate: stored ones serve a QuAILoRA run on another calibration text, while a
    QuAILoRA arm calibrated on other text, or an uncalibrated arm run with other training settings, is refused."""
    from bench.compare_init.store import check_compatible, reference_settings

    c4 = {"steps": 40, "calibration_data": "c4", "calibration_windows": 32}
    alpaca = {**c4, "calibration_data": "alpaca_train"}
    baselines = [{"arm": arm, "settings": c4, "path": f"{arm}.json"} for arm in ("qlora", "int8", "svd")]
    check_compatible(baselines, alpaca)  # accepted: none of them depends on the calibration text
    quailora = {"arm": "quailora@lr0.5", "settings": alpaca, "path": "quailora@lr0.5.json"}
    check_compatible([*baselines, quailora], alpaca)
    assert reference_settings([*baselines, quailora]) is alpaca  # the summary names the QuAILoRA arms' source
    assert reference_settings(baselines) is c4
    with pytest.raises(ValueError, match=r"quailora@lr0\.5\.json was run with other settings \(calibration_data: "
                                         r"stored 'alpaca_train', now 'c4'\)"):
        check_compatible([*baselines, quailora], c4)
    with pytest.raises(ValueError, match=r"qlora\.json was run with other settings \(steps: stored 40, now 120\)"):
        check_compatible(baselines, {**alpaca, "steps": 120})
    dynamic = {"arm": "dynamic", "settings": c4, "path": "dynamic.json"}  # the dynamic arm calibrates too
    with pytest.raises(ValueError, match="dynamic.json was run with other settings"):
        check_compatible([dynamic], alpaca)
