"""bench/_common.py: the headline metric (gap closed), the LoRA model the benchmarks build, and the atomic writers."""

import json
import math
import os
import types
from pathlib import Path

import pytest

from testing_utils import REPO_ROOT


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(REPO_ROOT)
    import bench._common

    return bench._common


def test_gap_closed_is_the_fraction_of_the_qlora_to_int8_gap(common):
    assert common.gap_closed(40.0, 35.0, 30.0) == 0.5
    assert common.gap_closed(40.0, 40.0, 30.0) == 0.0  # QLoRA's own start
    assert common.gap_closed(40.0, 30.0, 30.0) == 1.0  # the int8 reference
    assert common.gap_closed(40.0, 28.0, 30.0) == pytest.approx(1.2)  # better than int8: above 1


def test_gap_closed_sign_follows_the_gap(common):
    assert common.gap_closed(40.0, 42.0, 30.0) == pytest.approx(-0.2)  # worse than QLoRA: negative
    # a reference above QLoRA (a higher-is-worse metric where int8 happens to be worse) gives the same fractions
    assert common.gap_closed(30.0, 35.0, 40.0) == 0.5 and common.gap_closed(30.0, 28.0, 40.0) == pytest.approx(-0.2)


@pytest.mark.parametrize("qlora, value, int8", [(30.0, 29.0, 30.0), (30.0, 30.0, 30.0), (None, 1.0, 2.0),
                                                (3.0, None, 2.0), (3.0, 1.0, None), (3.0, math.nan, 2.0),
                                                (math.inf, 1.0, 2.0)])
def test_gap_closed_is_none_where_undefined(common, qlora, value, int8):
    """A zero gap, a missing or a non-finite value: None (never nan or inf), so JSON stays valid."""
    gap = common.gap_closed(qlora, value, int8)
    assert gap is None
    assert json.loads(json.dumps({"gap_closed": gap}, allow_nan=False)) == {"gap_closed": None}
    assert common.format_gap(gap) == "n/a" and common.format_gap(gap, missing="–") == "–"


def test_format_gap_prints_what_the_tables_printed_before(common):
    """`{:.1%}`, the same text as bench_quailora's former `{100 * gap:.1f}%`, so its committed table is unchanged."""
    import random

    rng = random.Random(0)
    for gap in [0.5567712309026068, -0.0004, 0.0, 1.0, 1.0727153135481289] + [rng.uniform(-2, 2) for _ in range(1000)]:
        assert common.format_gap(gap) == f"{100 * gap:.1f}%", gap
    assert common.format_gap(0.5567712309026068) == "55.7%"


def test_zero_gap_rows_print_n_a_in_the_script_tables(common):
    """bench_quailora and bench_calibration_size: a zero NF4 → int8 gap prints n/a, never nan, and stores null."""
    from bench import bench_calibration_size, bench_quailora

    args = types.SimpleNamespace(model="m", add_bos=False, threads=1)
    rows = bench_quailora.Rows([{"start": "LLM.int8 (B = 0)", "perplexity": 30.0},
                                {"start": "NF4 (B = 0, QLoRA start)", "perplexity": 30.0},
                                {"start": "r=8 QuAILoRA closed form", "perplexity": 29.0, "solve_seconds": 1.0}])
    table = bench_quailora.to_markdown(args, rows, types.SimpleNamespace(num_tokens=8), types.SimpleNamespace(
        numel=lambda: 4), 1.0, {})
    assert "| r=8 QuAILoRA closed form | 29.000 | n/a | 1.0 |" in table and "nan" not in table
    assert [row["gap_closed"] for row in rows] == [None] * 3
    json.dumps(rows, allow_nan=False)

    result = json.load(open(os.path.join(REPO_ROOT, "bench", "results", "calibration_size.json")))
    result["rows"][0].update(gap_closed=None, fit_gap_closed=common.gap_closed(2.0, 1.0, 2.0))
    table = bench_calibration_size.to_markdown(result)
    row = next(line for line in table.splitlines() if line.startswith(f"| {result['rows'][0]['tokens']} |"))
    assert row.count("| n/a |") == 2 and "nan" not in table


def test_writers_are_atomic_and_create_the_folder(common, tmp_path):
    md, data = common.write_results(str(tmp_path / "new" / "table"), "| a |\n", {"x": [1, 2.5], "gap": None})
    assert (md, data) == (str(tmp_path / "new" / "table.md"), str(tmp_path / "new" / "table.json"))
    assert open(md).read() == "| a |\n"
    assert open(data).read() == json.dumps({"x": [1, 2.5], "gap": None}, indent=1)  # bench/results' format

    def fail(temporary):
        with open(temporary, "w") as handle:
            handle.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        common.write_file(md, fail)
    assert open(md).read() == "| a |\n"  # the old file, whole
    assert sorted(os.listdir(tmp_path / "new")) == ["table.json", "table.md"]  # no temporary file left
    seen = []
    common.write_file(str(tmp_path / "plot.png"), lambda temporary: seen.append(temporary) or Path(temporary).touch())
    assert seen[0].endswith(".png") and os.path.dirname(seen[0]) == str(tmp_path)  # savefig picks the format


def test_lora_config_reads_the_scripts_target_lists(common):
    config = common.lora_config(8, target_modules="q_proj, v_proj")
    assert sorted(config.target_modules) == ["q_proj", "v_proj"] and config.lora_alpha == 8
    assert config.lora_dropout == 0.0 and common.lora_config(8, 16).lora_alpha == 16
    assert common.lora_config(4).target_modules == "all-linear"
    assert common.lora_config(4, task_type="CAUSAL_LM").task_type == "CAUSAL_LM"


def test_peft_model_matches_peft_built_by_hand(common, tiny_model_path):
    """By name (loaded in a quantization) or from a loaded base: the same adapter, and the same random A for the
    same seed as `torch.manual_seed` + `get_peft_model`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from hf_quailora import load_quantized_model

    base, _ = load_quantized_model(tiny_model_path, "none")
    torch.manual_seed(3)
    reference = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.0))
    expected = {name: value.clone() for name, value in reference.state_dict().items() if "lora_A" in name}
    model = common.peft_model(tiny_model_path, "none", rank=4, target_modules="q_proj,v_proj", seed=3,
                              adapter_name="r4")
    got = {name.replace(".r4.", ".default."): value for name, value in model.state_dict().items()
           if "lora_A" in name}
    assert set(got) == set(expected) and len(got) > 0
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert model.peft_config["r4"].lora_alpha == 4 and model.active_adapter == "r4"
    loaded, _ = load_quantized_model(tiny_model_path, "none")
    other = common.peft_model(loaded, rank=2, alpha=8, seed=4)
    assert other.peft_config["default"].r == 2 and other.peft_config["default"].lora_alpha == 8
    targets = {name.rsplit(".", 1)[-1] for name in other.peft_config["default"].target_modules}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear
