"""SIGKILL at named moments of a QuAILoRA-initialised DynamicRankTrainer run, then resume (tests/fault_harness.py):
no folder on disk is half-written, no finished checkpoint is lost, the QuAILoRA start is neither recomputed nor lost,
and the resumed run ends at the adapters and rank sequence of a run that never stopped, bit for bit. The soak run with
more kills is bench/bench_faults.py."""

import random
import sys

import pytest
from fault_harness import Harness

from testing_utils import one_thread, require_bitsandbytes  # noqa: F401 (autouse fixture)


pytestmark = [require_bitsandbytes,
              pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")]


def test_killed_at_every_moment_resumes_to_the_uninterrupted_run(tiny_model_path, tmp_path):
    harness = Harness(tiny_model_path, str(tmp_path))
    reference = harness.reference()
    assert [rank for _, rank in reference["rank_history"]] and len(reference["rank_history"]) == 6
    rng = random.Random(35)
    # One chain: each attempt is killed, the next resumes from the last checkpoint on disk (or starts again)
    plans = [harness.draw_plan(rng, "init"), harness.draw_plan(rng, "step", 2), harness.draw_plan(rng, "checkpoint", 2)]
    plans += [harness.draw_plan(rng, moment) for moment in ("sweep", "save_model", "export")]
    outcome = harness.trial(plans, "chain")

    assert [kill["moment"] for kill in outcome["kills"]] == [plan["moment"] for plan in plans]
    assert outcome["unloadable"] == [] and outcome["lost"] == []
    assert outcome["init_recomputed"] == 0
    assert outcome["same_ranks"] and outcome["equal"]
