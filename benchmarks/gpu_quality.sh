#!/usr/bin/env bash
# The quality study on llama-small on one GPU, in parts of under 10 minutes each on an H100; the
# merged table goes to benchmarks/RESULTS.md (dated, with the device). --smoke runs every part on
# CPU with tiny budgets (it checks the script, it measures nothing).
#
#   bash benchmarks/gpu_quality.sh PART [VARIANT_FILTER...]     PART: w4 | w3 | w2 | levers-w3 | levers-w2
#   bash benchmarks/gpu_quality.sh --smoke [PART...]            every part on CPU, tiny budgets
#
#   w4 / w3 / w2     FP, RTN, GPTQ, AWQ, QERA-exact on GPTQ, QAT CE / KD / KD+ov-freeze / best at
#                    W4g128 / W3g128 / W2g64 (recipes/small/quality/*.yaml: 500 x 16 x 512 = 4.1 M
#                    training tokens = every PTQ method's calibration budget, capped by the 3.7 M
#                    tokens of the split)
#   levers-w3/-w2    one lever at a time on top of QAT + KD (benchmarks/quality.py: levers())
#   VARIANT_FILTER   only the QAT variants whose name contains one of these words (split a part
#                    that would pass 10 minutes, e.g. `levers-w2 lsq mse init` then `levers-w2 kd lr freeze`)
#
# Each part writes $OUT/<part>/{report.json,report.md,report.png,log.txt}. Runs are reused while
# the runs/ folder is kept, so a part cut off at a time limit continues when started again. For a
# GPU machine without access to the package index or ../shared, prepare once, in the repo root:
#   printf '/.whl/\n/shared/\n' >> .git/info/exclude
#   mkdir -p shared/models shared/data && cp -r ../shared/models/llama-small shared/models/ \
#     && cp ../shared/data/books.train.txt.gz ../shared/data/books.valid.txt.gz shared/data/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# then, with .whl/ and shared/ beside the checkout on the GPU machine, one command per part:
#   bash benchmarks/gpu_quality.sh w4
# and, from the parts' report files:
#   python benchmarks/quality.py --merge <files_at>/w4/report.json <files_at>/w3/report.json ... \
#     --out runs/quality-small --append
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

SMOKE=()
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=(--smoke); shift
  PARTS=("${@:-w4 w3 w2 levers-w3 levers-w2}")
  PARTS=(${PARTS[*]})
  FILTER=()
else
  PARTS=("${1:?usage: gpu_quality.sh PART [VARIANT_FILTER...] | --smoke [PART...]}"); shift
  FILTER=("$@")
fi
RESULTS=${OUT:-$REPO/runs/gpu-quality${SMOKE:+-smoke}}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# the recipes name ../shared/...: on the device machine the fixtures travel as ./shared
if [ ! -d ../shared/models/llama-small ] && [ -d shared/models/llama-small ]; then
  ln -sfn "$REPO/shared" ../shared || { echo "cannot link ../shared to ./shared"; exit 2; }
fi
[ -d ../shared/models/llama-small ] || { echo "no ../shared/models/llama-small (see the header: copy and carry ./shared)"; exit 2; }
$PY - <<'EOF' || exit 2
import importlib, torch
missing = [m for m in ("pydantic", "datasets", "transformers", "accelerate", "peft", "safetensors", "yaml") if importlib.util.find_spec(m) is None]
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
if missing:
    raise SystemExit(f"missing packages: {missing} (carry wheels, see the header)")
EOF

status=0
for part in "${PARTS[@]}"; do
  case $part in
    w4) args=(--bits W4g128) ;;
    w3) args=(--bits W3g128) ;;
    w2) args=(--bits W2g64) ;;
    levers-w3) args=(--bits W3g128 --levers --levers-only --ptq gptq) ;;
    levers-w2) args=(--bits W2g64 --levers --levers-only --ptq gptq) ;;
    *) echo "unknown part $part (w4 | w3 | w2 | levers-w3 | levers-w2)"; exit 2 ;;
  esac
  [ ${#FILTER[@]} -gt 0 ] && args+=(--only "${FILTER[@]}")
  mkdir -p "$RESULTS/$part"
  echo "== part $part: ${args[*]} ${SMOKE[*]}"
  start=$SECONDS
  $PY benchmarks/quality.py --scale small "${args[@]}" "${SMOKE[@]}" --runs-root "runs/quality-small${SMOKE:+-smoke}" \
    --out "$RESULTS/$part" 2>&1 | grep -v -E 'it/s\]|s/it\]|^\s*$' | tee "$RESULTS/$part/log.txt"
  rc=${PIPESTATUS[0]}
  echo "== part $part: exit $rc after $((SECONDS - start)) s" | tee -a "$RESULTS/$part/log.txt"
  [ "$rc" = 0 ] || status=1
done
exit $status
