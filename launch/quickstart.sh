#!/usr/bin/env bash
# qat quickstart: a fresh machine, no GPU, no model hub, no downloaded data.
#  1. makes a virtual environment in .venv and installs qat (CPU PyTorch);
#  2. pretrains a ~3M-parameter Llama on the Python standard library's own source (a few minutes);
#  3. quantizes it to W4 (round-to-nearest) and evaluates it, then runs QAT at W4 with knowledge
#     distillation from the FP model and ov-freeze, and prints teacher vs W4 student perplexity.
# Usage: bash launch/quickstart.sh        (QAT_QUICKSTART_PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${QAT_QUICKSTART_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[export,plot]"  # export: packed checkpoints; plot: report.png
start=$(date +%s)
qat train recipes/quickstart/pretrain.yaml --overwrite
qat train recipes/quickstart/w4-ovfreeze.yaml output_dir=runs/quickstart/w4-rtn train.max_steps=0 --overwrite
qat train recipes/quickstart/w4-ovfreeze.yaml --overwrite
python - <<'PY'
import json
rtn = json.load(open("runs/quickstart/w4-rtn/eval.json"))
qat = json.load(open("runs/quickstart/w4-ovfreeze/eval.json"))
t = qat["teacher"]["ppl"]
print("\nvalidation perplexity (Python stdlib held-out files, %d tokens)" % qat["student"]["tokens"])
print(f"  FP teacher                 {t:8.3f}")
print(f"  W4 g64, before QAT (RTN)   {rtn['student']['ppl']:8.3f}   x{rtn['student']['ppl'] / t:.4f}")
print(f"  W4 g64, after QAT (KD+ov)  {qat['student']['ppl']:8.3f}   x{qat['student']['ppl'] / t:.4f}")
print("W4 model (on-grid weights, plain transformers format): runs/quickstart/w4-ovfreeze/final")
PY
echo "quickstart wall time: $(( $(date +%s) - start )) s (after install)"
