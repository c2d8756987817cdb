"""lm-eval is the `eval` extra: without it, hf_quailora imports, and every lm-eval piece raises an ImportError that
names `pip install 'hf_quailora[eval]'` (a fresh process where `import lm_eval` fails)."""

import json
import os
import subprocess
import sys

from testing_utils import REPO_ROOT


CHILD = r'''
import json, sys
sys.modules["lm_eval"] = None  # `import lm_eval` (and lm_eval.*) now raises ImportError, as when not installed

import hf_quailora
from hf_quailora.cli import main, make_parser

results = {"imported": "DynamicRankTrainer" in dir(hf_quailora)}

def attempt(name, call):
    try:
        call()
        results[name] = "no error"
    except ImportError as err:
        results[name] = str(err)

attempt("evaluate_ranks", lambda: hf_quailora.evaluate_ranks)
attempt("DynamicRankLM", lambda: hf_quailora.DynamicRankLM)
attempt("bridge", lambda: __import__("hf_quailora.evaluation.lm_eval_bridge"))
attempt("RankSweepCallback", lambda: hf_quailora.RankSweepCallback(None, ranks=[1]))
attempt("cli eval", lambda: main(["eval", "--adapter", "nowhere", "--ranks", "1", "--output_dir", "out"]))
attempt("cli lm-eval", lambda: main(["lm-eval", "--tasks", "quailora_wiki_ppl"]))
results["commands"] = sorted(make_parser()._subparsers._group_actions[0].choices)
print(json.dumps(results))
'''


def test_every_lm_eval_piece_names_the_extra_when_lm_eval_is_missing():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results.pop("imported") is True  # import hf_quailora stays light and works
    assert results.pop("commands") == ["eval", "export", "init", "lm-eval"]
    for piece, message in results.items():
        assert "pip install 'hf_quailora[eval]'" in message, (piece, message)
