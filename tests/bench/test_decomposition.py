"""bench/compare_init/decomposition.py: the distance to int8 and the split of the points lost during fine-tuning."""

import glob
import json
import math
import os

import pytest

from bench.compare_init.decomposition import decompose, decomposition_markdown, distance, split_points_lost


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _record(arm, seed, ppl_start, ppl_end, loss_start=2.0, loss_end=1.8):
    return {"model": "m", "rank": 8, "seed": seed, "arm": arm,
            "result": {"perplexity_start": ppl_start, "perplexity_end": ppl_end,
                       "eval_loss_start": loss_start, "eval_loss_end": loss_end}}


def test_split_sums_to_the_points_lost_of_the_log_gap():
    records = [_record("qlora", 1, 12.0, 11.0), _record("int8", 1, 10.0, 9.5), _record("quailora", 1, 10.5, 10.2)]
    row = next(r for r in decompose(records) if r["metric"] == "perplexity")
    d_n = (math.log(1.2), math.log(11.0 / 9.5))
    d_q = (math.log(1.05), math.log(10.2 / 9.5))
    assert row["d_n_start"]["mean"] == pytest.approx(d_n[0]) and row["d_q_end"]["mean"] == pytest.approx(d_q[1])
    gap = [1 - q / n for q, n in zip(d_q, d_n)]
    assert row["lost"]["mean"] == pytest.approx(gap[0] - gap[1])
    assert row["caught_up"]["mean"] + row["drift"]["mean"] == pytest.approx(row["lost"]["mean"])
    # an arm that does not move loses points only because QLoRA caught up
    still = split_points_lost((0.2, 0.1), (0.05, 0.05))
    assert still["drift"] == 0 and still["caught_up"] == pytest.approx(0.25)
    assert split_points_lost((0.0, 0.1), (0.05, 0.05)) is None
    assert distance({"eval_loss_end": 1.5}, {"eval_loss_end": 1.25}, "eval_loss", "end") == 0.25
    assert "| m | 8 | quailora |" in "\n".join(decomposition_markdown(decompose(records)))
    assert decomposition_markdown(decompose([_record("qlora", 1, 12.0, 11.0)])) == []


def test_stored_paper_runs_reproduce_the_issue_numbers():
    """SmolLM2, r = 64, 3 seeds, 40 steps: d_Q 0.0436 -> 0.0456 and d_N 0.202 -> 0.141 on held-out perplexity."""
    records = [json.load(open(path)) for path in glob.glob(
        os.path.join(ROOT, "bench/results/compare_init_paper/runs/*/*/*/*.json"))]
    records = [record for record in records if "result" in record]
    assert records, "the stored compare_init_paper runs are missing"
    row = next(r for r in decompose(records) if (r["model"], r["rank"], r["arm"], r["metric"])
               == ("smollm2-135m", 64, "quailora", "perplexity"))
    assert len(row["seeds"]) == 3
    assert (round(row["d_q_start"]["mean"], 4), round(row["d_q_end"]["mean"], 4)) == (0.0436, 0.0456)
    assert (round(row["d_n_start"]["mean"], 3), round(row["d_n_end"]["mean"], 3)) == (0.202, 0.141)
