#!/usr/bin/env bash
# Issue 36, item 5: the paper's full fine-tuning comparison on one GPU, in one device run. 2 models (SmolLM2-135M,
# Gemma-3-270m) x 2 ranks (16, 64) x 3 seeds x (QLoRA, QuAILoRA, int8) x 200 steps, with the recipes' defaults for
# the QuAILoRA arm: calibrated on the training examples, at the rate `lr_scale="auto"` picks at 2e-4 (x1, except
# x0.5 for Gemma at r = 64; docs/quailora.md). Every other setting is the CPU runs' (bench/RESULTS.md, "Issue 36"),
# so the numbers sit beside them. Seeds run outermost: a run cut short by SECONDS leaves whole seeds, and running the
# script again resumes (compare_init skips finished arms).
#
#   bash bench/gpu_compare_paper.sh OUTPUT_DIR [SECONDS]
#   DRY_RUN=1 bash bench/gpu_compare_paper.sh OUTPUT_DIR    # prints the commands, runs nothing (no GPU needed)
#
# Needs python3 with torch (CUDA), transformers, peft, trl, bitsandbytes and datasets importable, and the repository
# root as the working directory. SECONDS (default 540) bounds the whole run; the command running when it is spent is
# stopped (its finished arms are kept) and the later ones are skipped, and the log says so. Writes env.txt,
# compare.log and the comparison (runs/, results.md, results.json, convergence.png) to OUTPUT_DIR.
set -uo pipefail
out=${1:?usage: bash bench/gpu_compare_paper.sh OUTPUT_DIR [SECONDS]}
budget=${2:-540}
source "$(dirname "$0")/gpu_lib.sh"
mkdir -p "$out"
[ -z "${DRY_RUN:-}" ] && write_env "$out"
common=(--arms qlora,quailora,int8 --steps 200 --eval_steps 25 --batch_size 4 --max_length 256 --eval_windows 16
        --eval_examples 100 --curve_eval_examples 16 --calibration_data alpaca_train --calibration_windows 32
        --threads 8 --output_dir "$out")
rc=0
for seed in 1 2 3; do
  for case in "smollm2-135m 16" "smollm2-135m 64" "gemma3-270m 16" "gemma3-270m 64 0.5"; do
    read -r model rank scale <<< "$case"
    left=$((budget - (SECONDS - start)))
    if [ "$left" -le 0 ]; then echo "time spent: skipped $model r=$rank seed $seed"; rc=124; continue; fi
    run timeout "$left" python3 -m bench.compare_init "${common[@]}" --models "$model" --ranks "$rank" \
      --seeds "$seed" ${scale:+--quailora_lr_scale "$scale"} >> "$out/compare.log" 2>&1
    status=$?
    [ "$status" -ne 0 ] && rc=$status && echo "$model r=$rank seed $seed: rc $status"
  done
done
run python3 -m bench.compare_init --summary_only --output_dir "$out" >> "$out/compare.log" 2>&1
[ -z "${DRY_RUN:-}" ] && tail -n 40 "$out/results.md"
echo "rc $rc after $((SECONDS - start)) s"
exit "$rc"
