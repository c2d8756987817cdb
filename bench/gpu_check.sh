#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script: the CUDA-path tests (tests/test_cuda_path.py) and the GPU memory
# benchmark of the QuAILoRA initialisation (bench/bench_init_scaling.py --device cuda) at QuAILoRA's defaults
# (128 x 512 calibration tokens in batches of 8) on real models' shapes.
#
#   bash bench/gpu_check.sh OUTPUT_DIR [SECONDS]
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
exit $((tests_rc || bench_rc))
