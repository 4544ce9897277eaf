#!/usr/bin/env bash
# Throughput checks on one GPU: fused fake-quant exactness on CUDA, step time of plain vs
# QAT / QAT+KD / QAT+KD(top-k cache) / QAT-LoRA / torchao QAT, GPTQ wall time. --smoke runs every
# part on CPU (tiny random Llama: it checks the script, it measures nothing).
#
#   bash benchmarks/gpu_throughput.sh [--smoke] [PART ...]
#
# PARTS (default: all, in this order; each well under 10 minutes on an H100):
#   fused       pytest tests/test_quant_fused.py (the CUDA cases: compiled == eager bit for bit)
#   layer       benchmarks/fake_quant.py on LLaMA-7B projection shapes, 8192 tokens, bf16: QATLinear vs nn.Linear,
#               once with the eager and once with the compiled fake-quant (QAT_QUANT_KERNEL=eager|compile)
#   step-small  benchmarks/step_time.py --config small (llama-small, 8 x 1024, bf16 autocast, fp32 master)
#   step-1b     benchmarks/step_time.py --config 1b   (random-init ~0.95B Llama, 4 x 2048, bf16 autocast)
#   step-1b-bf16  the same with bf16 master weights (the peer measurement's setting)
#   step-1b-compiled  step-1b with every model torch.compile'd (--compile-model, as train.compile: true)
#   ptq-small   benchmarks/ptq_speed.py --config small
#   ptq-1b      benchmarks/ptq_speed.py --config 1b (128 x 2048 calibration tokens)
# Results: $OUT when set, else runs/gpu-throughput[-smoke]: PART.json + PART.log per part and
# summary.txt.
#
# For a GPU machine without access to the package index (torch, transformers, accelerate, peft,
# triton and pytest installed, not pydantic or torchao) or ../shared, prepare once, in the repo root:
#   printf '/.whl/\n/shared/\n' >> .git/info/exclude
#   mkdir -p shared/models && cp -r ../shared/models/llama-small shared/models/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl pydantic==2.13.4 pydantic-core==2.46.4 \
#     annotated-types==0.7.0 typing-inspection==0.4.2 torchao==0.17.0
# then, on the GPU machine with .whl/ and shared/ beside the checkout, e.g.:
#   bash benchmarks/gpu_throughput.sh fused layer step-small
#   bash benchmarks/gpu_throughput.sh step-1b step-1b-bf16
#   bash benchmarks/gpu_throughput.sh ptq-small ptq-1b
# and append the tables of the *.log files to benchmarks/RESULTS.md (dated, with the device line).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
PARTS=${*:-fused layer step-small step-1b step-1b-bf16 step-1b-compiled ptq-small ptq-1b}
if [ $SMOKE = 1 ]; then RESULTS=${OUT:-$REPO/runs/gpu-throughput-smoke}; else RESULTS=${OUT:-$REPO/runs/gpu-throughput}; fi
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# ../shared beside the repo, or shared/ inside it (copied to a GPU machine)
if [ ! -d "$REPO/../shared/models/llama-small" ] && [ -d "$REPO/shared/models/llama-small" ]; then
  export QAT_SHARED=$REPO/shared
fi

DEV=(); [ $SMOKE = 1 ] && DEV=(--device cpu)
FAIL=0
: >"$RESULTS/summary.txt"
part() {  # part NAME cmd...: run, log, record exit status and time
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$RESULTS/summary.txt"
  "$@" >"$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc ($((SECONDS - t0)) s)" | tee -a "$RESULTS/summary.txt"
  grep -v -E 'it/s\]|s/it\]|Warning|warn\(' "$RESULTS/$name.log" | tail -n 14
  [ $rc -ne 0 ] && FAIL=$((FAIL + 1))
  return 0
}
step() {  # step NAME step_time.py args (full) -- smoke args
  local name=$1; shift
  if [ $SMOKE = 1 ]; then
    local extra=(); [[ " $* " == *" --compile-model "* ]] && extra=(--compile-model --warmup 3)
    part "$name" $PY benchmarks/step_time.py --config smoke "${DEV[@]}" "${extra[@]}" --variants plain,qat,qat-compile,qat-kd,qat-kd-cached,qat-lora,torchao --json "$RESULTS/$name.json"
  else
    part "$name" $PY benchmarks/step_time.py "$@" --variants plain,qat,qat-eager,qat-kd,qat-kd-cached,qat-lora,torchao --json "$RESULTS/$name.json"
  fi
}

for p in $PARTS; do
  case $p in
    fused) part fused $PY -m pytest -q -p no:cacheprovider tests/test_quant_fused.py ;;
    layer)  # the same layer benchmark with the eager and the compiled fake-quant (QAT_QUANT_KERNEL)
      if [ $SMOKE = 1 ]; then LAYER=(--shapes 256x256 --reps 2); else LAYER=(--device cuda --dtype bfloat16 --shapes 4096x4096,11008x4096,4096x11008 --tokens 8192); fi
      part layer bash -c "QAT_QUANT_KERNEL=eager $PY benchmarks/fake_quant.py ${LAYER[*]} && QAT_QUANT_KERNEL=compile $PY benchmarks/fake_quant.py ${LAYER[*]}" ;;
    step-small) step step-small --config small --batch 8 --seq 1024 --steps 20 --warmup 5 ;;
    step-1b) step step-1b --config 1b --batch 4 --seq 2048 --steps 10 --warmup 3 ;;
    step-1b-bf16) step step-1b-bf16 --config 1b --batch 4 --seq 2048 --steps 10 --warmup 3 --weights bfloat16 ;;
    step-1b-compiled) step step-1b-compiled --config 1b --batch 4 --seq 2048 --steps 10 --warmup 5 --compile-model ;;  # train.compile
    ptq-small)
      if [ $SMOKE = 1 ]; then part ptq-small $PY benchmarks/ptq_speed.py --config smoke "${DEV[@]}" --json "$RESULTS/ptq-small.json"
      else part ptq-small $PY benchmarks/ptq_speed.py --config small --json "$RESULTS/ptq-small.json"; fi ;;
    ptq-1b)
      if [ $SMOKE = 1 ]; then part ptq-1b $PY benchmarks/ptq_speed.py --config smoke "${DEV[@]}" --calib-seqs 4 --json "$RESULTS/ptq-1b.json"
      else part ptq-1b $PY benchmarks/ptq_speed.py --config 1b --calib-seqs 128 --seq 2048 --json "$RESULTS/ptq-1b.json"; fi ;;
    *) echo "unknown part: $p (fused layer step-small step-1b step-1b-bf16 step-1b-compiled ptq-small ptq-1b)"; FAIL=$((FAIL + 1)) ;;
  esac
done
echo "failed parts: $FAIL" | tee -a "$RESULTS/summary.txt"
exit $FAIL
