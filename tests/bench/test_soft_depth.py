"""bench/bench_soft_depth.py's variants: `--arms`, `--soft-exit-weights` and `--report --baseline` (no model runs)."""

import json

import pytest

from testing_utils import REPO_ROOT


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(REPO_ROOT)
    import bench.bench_soft_depth

    return bench.bench_soft_depth


SETTINGS = {"models": "m", "seeds": "0,1", "steps": 20, "batch_size": 2, "max_length": 64, "threads": 1,
            "output": "all.json", "skip_cost": True}
START = {"8": {"loss": 18.0396, "perplexity": 1.4284e9}, "30": {"loss": 2.0631, "perplexity": 27.707}}


def _scores(loss):
    return {"8": {"loss": loss + 10, "perplexity": 1e8}, "30": {"loss": loss, "perplexity": 27.0}}


def _record(settings, runs, start=START):
    return {"settings": settings, "cost": {}, "quality": {"m": {"exits": [8, 30], "start": start, "runs": runs}}}


def _baseline():
    return _record(SETTINGS, {seed: {"soft": _scores(2.0), "sft": _scores(1.9), "sft+ict": _scores(1.8)}
                              for seed in ("0", "1")})


def _variant(**changes):
    settings = {**SETTINGS, "seeds": "0", "arms": "soft", "soft_exit_weights": "0.1,0.1,0.1,1",
                "output": "w.json", **changes}
    start = {k: {"loss": v["loss"] + 1e-5, "perplexity": v["perplexity"]} for k, v in START.items()}
    return _record(settings, {"0": {"soft": _scores(1.95)}}, start)


def test_arms_and_exit_weights_are_parsed_or_refused(bench):
    assert bench.parse_arms("soft") == ["soft"] and bench.parse_arms("soft,sft,ict") == ["soft", "sft", "ict"]
    assert bench.parse_exit_weights(None) is None
    assert bench.parse_exit_weights("0.1,0.1,0.1,1") == [0.1, 0.1, 0.1, 1.0]
    for bad in ("", "soft,icx", "ict"):  # empty, unknown, ict without its sft adapter
        with pytest.raises(ValueError, match="--arms"):
            bench.parse_arms(bad)
    for bad in ("1,1", "1,1,1,0", "1,1,1,inf", "1,a,1,1"):
        with pytest.raises(ValueError, match="--soft-exit-weights"):
            bench.parse_exit_weights(bad)
    with pytest.raises(ValueError, match="needs sft"):  # before any model loads
        bench.main(["--arms", "ict", "--skip-cost"])


def test_baseline_fills_the_missing_arms_at_the_same_seeds(bench):
    merged = bench.merge_baseline(_variant(), _baseline(), "all.json")
    run = merged["quality"]["m"]["runs"]["0"]
    assert run["soft"] == _scores(1.95) and run["sft"] == _scores(1.9) and run["sft+ict"] == _scores(1.8)
    assert merged["quality"]["m"]["baseline_arms"] == ["sft", "sft+ict"]
    assert "sft" not in _variant()["quality"]["m"]["runs"]["0"]  # the record itself is left alone
    table = bench.quality_table("m", merged["quality"]["m"], "0.1,0.1,0.1,1")
    assert "SoFT exit weights 0.1,0.1,0.1,1; sft, sft+ict from all.json" in table
    assert "| 30 | 2.063 | 1.950 ± 0.000 | 1.900 ± 0.000 | 1.800 ± 0.000 |" in table
    assert "| 30 | 2.063 | 1.950 ± 0.000 | – | – |" in bench.quality_table("m", _variant()["quality"]["m"])


@pytest.mark.parametrize("variant, message", [
    (_variant(steps=40), "steps 20"),  # another setting
    (_variant(seeds="2"), "no seed 2"),
])
def test_baseline_is_refused_unless_the_comparison_is_exact(bench, variant, message):
    if message.startswith("no seed"):
        variant["quality"]["m"]["runs"] = {"2": variant["quality"]["m"]["runs"]["0"]}
    with pytest.raises(ValueError, match=message):
        bench.merge_baseline(variant, _baseline(), "all.json")


def test_baseline_is_refused_from_another_start(bench):
    variant = _variant()
    variant["quality"]["m"]["start"]["30"]["loss"] = 2.07
    with pytest.raises(ValueError, match="not the same start"):
        bench.merge_baseline(variant, _baseline(), "all.json")


def test_report_with_baseline(bench, tmp_path, capsys):
    (tmp_path / "all.json").write_text(json.dumps(_baseline()))
    (tmp_path / "w.json").write_text(json.dumps(_variant()))
    bench.main(["--report", str(tmp_path / "w.json"), "--baseline", str(tmp_path / "all.json")])
    out = capsys.readouterr().out
    assert "mean ± std over 1 seeds; SoFT exit weights 0.1,0.1,0.1,1; sft, sft+ict from" in out
    assert "| 8 | 18.040 | 11.950 ± 0.000 | 11.900 ± 0.000 | 11.800 ± 0.000 |" in out
