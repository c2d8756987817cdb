# Sourced by the device scripts (bench/gpu_check.sh, bench/gpu_compare_paper.sh) after they set `budget`: checks it,
# sets the offline environment, starts the clock (`start`) and defines `run` (DRY_RUN=1: print, do not run) and
# `write_env OUTPUT_DIR` (the GPU and package versions, to env.txt and the terminal).
case "$budget" in
  ''|*[!0-9]*) echo "SECONDS ($budget) must be a whole number of seconds, e.g. 540" >&2; exit 2 ;;
esac
# USE_HUB_KERNELS=NO: offline, transformers' default Hub kernels fail a GPU load (README, Known limits); the
# benchmarks call from_pretrained themselves, so load_quantized_model's use_kernels=False does not reach them.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=NO
start=$SECONDS
exec 4>&2  # the dry run's commands go to stderr, past each command's own redirection to a log
run() {
  if [ -n "${DRY_RUN:-}" ]; then echo "+ $*" >&4; else "$@"; fi
}
write_env() {
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
  } > "$1/env.txt" 2>&1
  cat "$1/env.txt"
}
