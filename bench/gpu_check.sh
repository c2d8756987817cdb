#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script: the CUDA-path tests (tests/test_cuda_path.py) and the GPU memory
# benchmark of the QuAILoRA initialisation (bench/bench_init_scaling.py --device cuda) at QuAILoRA's defaults
# (128 x 512 calibration tokens in batches of 8) on real models' shapes; then (issue 34) the same init with its solves
# and Gram matrices on the CPU (its GPU peak, and its time against the all-on-GPU run above), and the fine-tuning
# peak of SFTTrainer (QLoRA) and DynamicRankTrainer after a QuAILoRA start, batch 1 x 2048, paged 8-bit AdamW
# (bench/bench_finetune_memory.py --device cuda), at the Llama-3.2-1B/3B and 3.1-8B shapes.
#
#   bash bench/gpu_check.sh OUTPUT_DIR [SECONDS]
#
# SECONDS bounds the first benchmark; the two later ones share a second SECONDS (FT_SECONDS, default 600).
#
# Needs python3 with torch (CUDA), transformers, peft, trl, bitsandbytes and datasets importable, and the repo root as
# the working directory. SECONDS (default 420) bounds the benchmark: cases and modes that would start later are
# skipped and said so. Writes env.txt, cuda_tests.log, bench.log and init_scaling_cuda.{md,json,png} to OUTPUT_DIR.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTPUT_DIR [SECONDS]}
budget=${2:-420}
mkdir -p "$out"
# USE_HUB_KERNELS=NO: offline, transformers' default Hub kernels fail a GPU load (README, Known limits); the
# benchmark calls from_pretrained itself, so load_quantized_model's use_kernels=False does not reach it.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=NO
start=$SECONDS
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # printed, so that a missing package is visible in env.txt
        print(name, "FAILED:", repr(err))
PY
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda_path.py > "$out/cuda_tests.log" 2>&1
tests_rc=$?
grep -E "passed|failed|error|differs" "$out/cuda_tests.log" | tail -n 12
echo "CUDA-path tests: rc $tests_rc after $((SECONDS - start)) s"
left=$((budget - (SECONDS - start)))
python3 bench/bench_init_scaling.py --device cuda --threads 8 --shapes 576x1536x30 \
  --models Llama-3.2-1B,Llama-3.2-3B,Llama-3.1-8B --modes replay,off --windows 128 --window-length 512 \
  --batch-size 8 --time-limit "$left" --output "$out/init_scaling_cuda" > "$out/bench.log" 2>&1
bench_rc=$?
grep -vE "Loading|Writing|kernels-community|trust check" "$out/bench.log" | tail -n 25
echo "benchmark: rc $bench_rc; total $((SECONDS - start)) s"
models=Llama-3.2-1B,Llama-3.2-3B,Llama-3.1-8B
ft_start=$SECONDS
ft_budget=${FT_SECONDS:-600}
python3 bench/bench_init_scaling.py --device cuda --threads 8 --shapes "" --models "$models" --modes replay \
  --windows 128 --window-length 512 --batch-size 8 --solve-device cpu --gram-device cpu \
  --time-limit $((ft_budget / 3)) --output "$out/init_scaling_cuda_offload" > "$out/bench_offload.log" 2>&1
offload_rc=$?
grep -vE "Loading|Writing|kernels-community|trust check" "$out/bench_offload.log" | tail -n 25
left=$((ft_budget - (SECONDS - ft_start)))
python3 bench/bench_finetune_memory.py --device cuda --threads 8 --shapes "" --models "$models" --batch-size 1 \
  --length 2048 --steps 2 --optim paged_adamw_8bit --calibration-samples 128 --calibration-length 512 \
  --solve-device cpu --gram-device cpu --time-limit "$left" --output "$out/finetune_memory_cuda" \
  > "$out/bench_finetune.log" 2>&1
finetune_rc=$?
grep -vE "Loading|Writing|kernels-community|trust check" "$out/bench_finetune.log" | tail -n 12
echo "offloaded init: rc $offload_rc; fine-tuning: rc $finetune_rc; total $((SECONDS - start)) s"
exit $((tests_rc || bench_rc || offload_rc || finetune_rc))
