"""One process of a two-process run (gloo, CPU) dies, or stops answering, at the Gram all-reduce of the QuAILoRA init,
the rank broadcast, a checkpoint or the lm-eval sweep: the other never hangs (tests/scripts/dies_midway.py; docs/limits.md,
"Faults")."""

import json
import os
import subprocess
import sys

import pytest

from testing_utils import SCRIPTS_DIR, require_bitsandbytes


pytestmark = [require_bitsandbytes, pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")]


def test_a_dead_or_stuck_process_makes_the_other_raise_naming_the_collective(tiny_model_path, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    points = ["gram", "rank", "checkpoint", "rank_stuck", "sweep"]
    command = [sys.executable, os.path.join(SCRIPTS_DIR, "dies_midway.py"), tiny_model_path, str(tmp_path), *points]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = {point: json.loads((tmp_path / f"{point}.json").read_text()) for point in points}

    # A dead process closes its connections: the survivor raises at once, naming what it was doing
    for point, what in [("gram", "the all-reduce of the QuAILoRA init's Gram matrices"),
                        ("rank", "the broadcast of the LoRA rank drawn for this step"),
                        ("checkpoint", "the wait for every process to write checkpoint-2")]:
        assert outcome[point]["survivor_exit"] == 1, outcome[point]
        assert outcome[point]["error"].startswith(f"RuntimeError: Process 0 of 2: {what} failed"), outcome[point]
        assert outcome[point]["seconds_after_kill"] < 10
    # The checkpoint process 1 died writing is not published; the one before is complete, with both RNG states
    run = tmp_path / "checkpoint"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "dynamic_rank_state.pt", "optimizer.pt"} <= {
        p.name for p in (run / "checkpoint-1").iterdir()}
    # Alive but stuck: the survivor raises once the process group's timeout (5 s here) has passed
    stuck = outcome["rank_stuck"]
    assert stuck["survivor_exit"] == 1 and "Timed out" in stuck["error"], stuck
    assert 4 < stuck["seconds_after_kill"] < 15
    # The sweep has no collective: each process evaluates on its own, so the survivor finishes it and the run
    assert outcome["sweep"]["survivor_exit"] == 0 and outcome["sweep"]["seconds_after_kill"] < 30
    assert json.loads((tmp_path / "sweep" / "rank_sweep" / "results.json").read_text())
