"""bench/bench_init_scaling.py end to end on a tiny shape (fresh processes per case, as in the real run), its
formula table for real models, and its input checks."""

import json
import os
import subprocess
import sys

import pytest

from testing_utils import REPO_ROOT, require_bitsandbytes


SCRIPT = os.path.join(REPO_ROOT, "bench", "bench_init_scaling.py")


def load_script():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import bench_init_scaling
    finally:
        sys.path.pop(0)
    return bench_init_scaling


@require_bitsandbytes
def test_init_scaling_measures_both_modes_and_writes_table_json_and_plot(tmp_path):
    output = tmp_path / "scaling"
    command = [sys.executable, SCRIPT, "--shapes", "128x256x2", "--windows", "2", "--window-length", "16",
               "--batch-size", "2", "--rank", "2", "--threads", "1", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((output.with_suffix(".json")).read_text())["rows"]
    assert [row["streaming"] for row in rows] == ["off", "replay"]
    for row in rows:
        assert row["peak_extra"] > 0 and row["seconds"] > 0 and row["formula"] > 0
    replay = rows[1]
    assert replay["gram_per_block"] * 2 == replay["gram_all_blocks"]  # two blocks
    table = (output.with_suffix(".md")).read_text()
    assert "streamed (replay)" in table and "all at once" in table
    assert (output.with_suffix(".png")).stat().st_size > 0
    # --rerender: the same measurements, the formula recomputed by the current code (here: the same code)
    result = subprocess.run([sys.executable, SCRIPT, "--rerender", "--output", str(output)], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rerendered = json.loads((output.with_suffix(".json")).read_text())
    assert rerendered["settings"]["shapes"] == "128x256x2" and rerendered["settings"]["rank"] == 2  # the run's own
    again = rerendered["rows"]
    measured = [(row["peak_extra"], row["formula"]) for row in rows]
    assert [(row["peak_extra"], row["formula"]) for row in again] == measured


def test_memory_contract_covers_the_readme_models_and_streaming_fits_where_all_at_once_does_not():
    table = load_script().memory_contract()
    rows = [line for line in table.splitlines() if line.startswith("| Llama") or line.startswith("| Qwen")]
    assert len(rows) == 6
    llama_8b = next(row for row in rows if row.startswith("| Llama-3.1-8B"))
    assert llama_8b.endswith("| no / yes | no / yes | yes / yes |")  # 24 and 48 GB: only streamed fits


@pytest.mark.parametrize("text", ["100x200", "100x200x2", "128xax2", "128x256x0"])
def test_bad_shapes_are_rejected(text):
    with pytest.raises(ValueError, match="--shapes"):
        load_script().parse_shapes(text)


def test_unknown_model_shapes_are_rejected_naming_the_known_ones():
    with pytest.raises(ValueError, match="--models: Llama-9B not among Llama-3.2-1B"):
        load_script().parse_models("Llama-3.2-1B,Llama-9B")
