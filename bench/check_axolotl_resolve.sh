#!/usr/bin/env bash
# Does pip's resolver install axolotl and hf_quailora into one environment? (issue: axolotl 0.21 pins
# lm_eval==0.4.11, hf_quailora's per-rank benchmarks need lm-eval>=0.4.13, so lm-eval is the `eval` extra.)
#
#   bash bench/check_axolotl_resolve.sh                 # axolotl==0.21.* with hf_quailora (no extras)
#   bash bench/check_axolotl_resolve.sh '.[eval]'       # ... with the eval extra: expected to conflict
#   PYTHON=/path/to/python3.12 AXOLOTL='axolotl==0.21.*' bash bench/check_axolotl_resolve.sh
#
# Needs a Python >= 3.12 (axolotl's floor) and the package index; installs nothing: a throwaway venv runs
# `pip install --dry-run --ignore-installed --report`. Prints the resolved versions, or pip's conflict message.
# Exit status: 0 when it resolves, 1 when it does not.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.12}
AXOLOTL=${AXOLOTL:-axolotl==0.21.*}
TARGET=${1:-.}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
echo "python: $("$work/venv/bin/python" --version), pip: $("$work/venv/bin/python" -m pip --version | cut -d' ' -f2)"
echo "resolving: $AXOLOTL + $TARGET"
if "$work/venv/bin/python" -m pip install --dry-run --ignore-installed --report "$work/report.json" \
        "$AXOLOTL" "$TARGET" >"$work/log" 2>&1; then
    "$work/venv/bin/python" - "$work/report.json" <<'PY'
import json, re, sys
report = json.load(open(sys.argv[1]))["install"]
installs = {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"] for item in report}
print(f"RESOLVES: {len(installs)} packages")
for name in ("axolotl", "hf-quailora", "lm-eval", "torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate"):
    print(f"  {name}=={installs.get(name, '(not installed)')}")
PY
    exit 0
fi
echo "DOES NOT RESOLVE; pip says:"
grep -iE "conflict|depends on|requested|because|cannot install|ResolutionImpossible|error" "$work/log" | head -30 || tail -30 "$work/log"
exit 1
