"""Every Python block of the README runs, in order, as one program (on the tiny model, at reduced sizes).

The bash blocks show scripts that have their own end-to-end tests (test_recipes, test_alpaca_recipe,
test_lm_eval_bridge's CLI test).
"""

import os
import re

from testing_utils import REPO_ROOT, require_bitsandbytes


README = os.path.join(REPO_ROOT, "README.md")
SMALLER = {"max_steps=20": "max_steps=2", "limit=50": "limit=1", "limit=20": "limit=1", "num_windows=32": "num_windows=4",
           "calibration_samples=64": "calibration_samples=4"}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), flags=re.S)


@require_bitsandbytes
def test_readme_python_blocks_run(tiny_model_path, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(blocks):
        code = block.replace('"smollm2-135m"', repr(tiny_model_path)).replace("pretrained=smollm2-135m",
                                                                               f"pretrained={tiny_model_path}")
        for big, small in SMALLER.items():
            code = code.replace(big, small)
        exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
    for produced in ("outputs/run/quailora_report.json", "outputs/dyn/adapter-r4/adapter_config.json",
                     "outputs/dyn/adapter/dynamic_rank.json", "outputs/rank_sweep/results.png"):
        assert (tmp_path / produced).is_file(), produced
