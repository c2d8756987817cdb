"""The lm-eval bridge on the real SmolLM2-135M (NF4) with a briefly trained dynamic-rank adapter (slow, runs in CI)."""

import json
import math

import pytest
from lm_eval import simple_evaluate
from peft import LoraConfig, get_peft_model

from hf_quailora import DynamicRankConfig, DynamicRankTrainer, evaluate_ranks, export_rank
from hf_quailora.cli import main as cli_main
from hf_quailora.embedded.data import load_alpaca_sft
from hf_quailora.evaluation.lm_eval_bridge import resolve_tasks
from hf_quailora.quantization import load_quantized_model

from testing_utils import require_bitsandbytes


pytestmark = [pytest.mark.slow, require_bitsandbytes]
TASK = "quailora_wiki_ppl"


@pytest.fixture(scope="module")
def trained(smollm2_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dyn")
    model, tokenizer = load_quantized_model(smollm2_path, "nf4")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = DynamicRankConfig(output_dir=str(folder), max_steps=4, per_device_train_batch_size=4, max_length=128,
                             learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
                             gradient_checkpointing=False, update_rule="nested", eval_ranks=[1, 8], seed=0)
    trainer = DynamicRankTrainer(model, args=args, train_dataset=load_alpaca_sft(num_examples=16),
                                 processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(folder / "adapter"))
    return model, tokenizer, folder


def test_ranks_differ_and_registered_model_matches_stock_hf_on_the_exported_adapter(trained, smollm2_path):
    model, tokenizer, folder = trained
    # the base the adapter was trained on is recorded, so the CLI and hf-dynrank reload it by default
    assert json.loads((folder / "adapter" / "dynamic_rank.json").read_text())["quantization"] == "nf4"
    rows = evaluate_ranks(model, tokenizer, [1, 8], TASK, limit=2, output_dir=str(folder / "sweep"),
                          show_progress=False)
    bpb = {row["rank"]: row["value"] for row in rows if row["metric"] == "bits_per_byte"}
    assert all(math.isfinite(v) for v in bpb.values()) and bpb[1] != bpb[8]
    assert (folder / "sweep" / "results.png").read_bytes().startswith(b"\x89PNG")

    exported = export_rank(model, 4, str(folder / "r4"))
    _, manager = resolve_tasks(TASK)
    common = dict(tasks=[TASK], limit=2, task_manager=manager, log_samples=False, bootstrap_iters=0, device="cpu")
    # Both on the full-precision base: lm-eval's stock model would trigger bitsandbytes' CPU fast path (bf16
    # kernels), which changes the numbers independently of the adapter.
    ours = simple_evaluate(model="hf-dynrank", model_args=f"pretrained={smollm2_path},peft={folder / 'adapter'},"
                           "rank=4,quantization=none", **common)
    stock = simple_evaluate(model="hf", model_args=f"pretrained={smollm2_path},peft={exported},dtype=float32",
                            **common)
    a, b = (r["results"][TASK]["bits_per_byte,none"] for r in (ours, stock))
    assert math.isclose(a, b, rel_tol=1e-4), (a, b)


def test_cli_on_the_real_model(trained, smollm2_path, tmp_path):
    _, _, folder = trained
    out = tmp_path / "cli"
    assert cli_main(["eval", "--model", smollm2_path, "--adapter", str(folder / "adapter"),  # NF4 from the metadata
                     "--ranks", "1,8", "--tasks", TASK, "--limit", "1", "--output_dir", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {row["rank"] for row in rows} == {None, 1, 8}
