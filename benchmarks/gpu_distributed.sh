#!/usr/bin/env bash
# GPU checks of qat's distributed paths that CI (2 CPU cores, no GPU) cannot run; the dated results
# go to benchmarks/RESULTS.md. Each check prints PASS/FAIL/SKIP and a JSON line; the summary is at
# the end and in $RESULTS/summary.txt. Exit code: the number of FAILs.
#
#   bash benchmarks/gpu_distributed.sh [small] [1b] [deepspeed]        (default: all three)
#
# What it checks (one GPU, so FSDP2 runs as 1 process: the sharding code paths -- DTensor
# parameters, all-gather in pre-forward hooks, reduce-scatter, DCP sharded checkpoints, gathered
# full state dict -- all run, with a mesh of size 1):
#  small  llama-small (../shared), W4 g128, KD from the bf16 teacher, ov-freeze, bf16 autocast:
#    probe   accelerate FSDP2 (fsdp_version 2, launch/fsdp2-8gpu.yaml with --num_processes 1) and
#            qat.train's own setup: student AND teacher parameters are DTensors, every fake-quant
#            forward sees the full all-gathered weight, one KD step gives a finite loss and global
#            gradient norm, accelerator.get_state_dict gathers full tensors
#    rtn     train.max_steps=0 (the RTN starting point, for the ov-frozen layers)
#    gpu1    60 steps on one GPU without FSDP (launch/gpu-1.yaml), the reference
#    fsdp2   the same 60 steps under FSDP2, checkpoints every 30 (sharded, DCP)
#            -> final/ loads with plain transformers, every quantized weight exactly on its grid,
#               ov-frozen layers identical to the RTN start
#            -> vs gpu1: per-step loss within 5% relative, final val ppl within 2% (bf16 autocast,
#               different reduction order and kernels: not bit-identical on a GPU)
#    resume  a copy of the fsdp2 run cut back to its step-30 checkpoint, resumed with
#            checkpoint.resume=auto -> steps 31-60 loss within 1%, final val ppl within 0.5%
#  1b     a random-init ~1B Llama (hidden 2048, 16 layers, 32 heads / 8 KV, MLP 8192, vocab 8192),
#         student and teacher (the same weights) under FSDP2, bf16, W4 g128 ov-freeze, seq 512:
#    probe   as above, with peak memory
#    train   20 steps, checkpoint every 10 -> exit 0, finite losses, final/ on grid, tokens/s, peak mem
#    resume  cut back to step 10, resumed -> steps 11-20 loss within 1%
#  deepspeed  launch/deepspeed-zero2.yaml with --num_processes 1 on llama-small, 10 steps: exit 0 and
#         10 logged steps ("at least launches"). SKIP if deepspeed is not importable.
#
# On a GPU machine without access to the package index (torch, transformers and accelerate
# installed, but not pydantic, datasets or deepspeed) and without ../shared, prepare on a
# machine with access, in the repo root:
#   printf '/.whl/\n/shared/\n' >> .git/info/exclude
#   mkdir -p shared/models shared/data && cp -r ../shared/models/llama-small shared/models/ && cp -r ../shared/tokenizer shared/ \
#     && cp ../shared/data/books.train.txt.gz ../shared/data/books.valid.txt.gz shared/data/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson
#   python3 -m pip download --no-deps --no-binary=:all: -d .whl deepspeed      # an sdist; optional
# then copy the checkout with .whl/ and shared/ to the GPU machine and run
# `bash benchmarks/gpu_distributed.sh` there (or its parts "small" / "1b" / "deepspeed" one by one).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
RESULTS=${OUT:-$REPO/runs/gpu-distributed}
WORK=${WORK:-/tmp/qat-gpu}
mkdir -p "$RESULTS" "$WORK"
PARTS=${*:-small 1b deepspeed}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

# carried wheels (see above), and qat itself from the working tree
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import deepspeed" 2>/dev/null && ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1; then
  DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz \
    >"$RESULTS/deepspeed-install.log" 2>&1 || echo "deepspeed sdist did not install (see deepspeed-install.log)"
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

SHARED=${SHARED:-}
for d in "$REPO/shared" "$REPO/../shared"; do
  [ -z "$SHARED" ] && [ -d "$d/models/llama-small" ] && SHARED=$(cd "$d" && pwd)
done
TOK="$SHARED/tokenizer"
DATA=("data.files=$SHARED/data/books.train.txt.gz" "data.valid_files=$SHARED/data/books.valid.txt.gz")

PASS=0; FAIL=0; SKIP=0
: >"$RESULTS/summary.txt"
record() {  # record STATUS NAME DETAIL
  echo "$1 $2 $3" | tee -a "$RESULTS/summary.txt"
  case $1 in PASS) PASS=$((PASS + 1)) ;; FAIL) FAIL=$((FAIL + 1)) ;; *) SKIP=$((SKIP + 1)) ;; esac
}
check() {  # check NAME cmd... : PASS if the command exits 0; its last JSON line is the detail
  local name=$1; shift
  local log="$RESULTS/$name.log"
  local t0=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  local detail; detail=$(grep -E '^\{"ok"' "$log" | tail -n1)
  [ -z "$detail" ] && detail=$(tail -n 3 "$log" | tr '\n' ' ' | cut -c1-400)
  if [ $rc -eq 0 ]; then record PASS "$name" "($((SECONDS - t0))s) $detail"; else record FAIL "$name" "(rc=$rc, $((SECONDS - t0))s) $detail"; fi
  return $rc
}
qat() { $PY -m qat train "$@"; }
launch() {  # launch CONFIG [accelerate args] -- [qat train args]
  local cfg=$1; shift
  $PY -m accelerate.commands.launch --config_file "$cfg" --num_processes 1 "$@"
}
cut_to() {  # cut_to SRC DST STEP: a copy of run SRC as if killed right after checkpoint STEP
  rm -rf "$2" && cp -r "$1" "$2" && rm -rf "$2/final" "$2/eval.json"
  for c in "$2"/checkpoints/step-*; do [ "${c##*-}" -gt "$3" ] && rm -rf "$c"; done
  [ -d "$2/checkpoints/step-$3" ]
}
rows_at_least() {  # rows_at_least RUN N: metrics.jsonl has N loss rows, all finite
  $PY - "$1" "$2" <<'EOF'
import json, math, sys
rows = [json.loads(x) for x in open(sys.argv[1] + "/metrics.jsonl") if x.strip()]
losses = [r["loss"] for r in rows if "loss" in r]
tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
mem = max((r.get("peak_mem_gb") or 0) for r in rows)
ok = len(losses) >= int(sys.argv[2]) and all(math.isfinite(x) for x in losses)
print(json.dumps({"ok": ok, "rows": len(losses), "last_loss": losses[-1] if losses else None,
                  "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None, "peak_mem_gb": mem}))
sys.exit(0 if ok else 1)
EOF
}

{
  echo "== $(date -u +%FT%TZ)  parts: $PARTS"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  $PY -c "import pydantic, datasets; print('pydantic', pydantic.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -n1
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -n1
  echo "shared fixtures: ${SHARED:-NOT FOUND}"
} | tee "$RESULTS/env.txt"

if [ -z "$SHARED" ]; then
  record FAIL setup "no llama-small fixture: copy ../shared into ./shared and carry it (see the header)"
  exit 1
fi

FSDP=(launch/fsdp2-8gpu.yaml)
SMALL=(recipes/small/w4g128.yaml "model.path=$SHARED/models/llama-small" "${DATA[@]}" "freeze.policy=ov-freeze"
       "data.max_train_tokens=524288" "data.max_valid_tokens=65536" "train.log_every=1" "train.warmup_steps=5"
       "eval.every=0" "eval.max_batches=8" "tracking.wandb_project=null")

if [[ " $PARTS " == *" small "* ]]; then
  check small-fsdp2-probe launch "${FSDP[@]}" benchmarks/gpu_distributed_checks.py probe "${SMALL[@]}" "output_dir=$WORK/probe"
  check small-rtn qat "${SMALL[@]}" "output_dir=$WORK/small-rtn" train.max_steps=0 --overwrite
  check small-gpu1 launch launch/gpu-1.yaml -m qat train "${SMALL[@]}" "output_dir=$WORK/small-gpu1" train.max_steps=60 --overwrite
  if check small-fsdp2 launch "${FSDP[@]}" -m qat train "${SMALL[@]}" "output_dir=$WORK/small-fsdp2" train.max_steps=60 \
       checkpoint.every=30 checkpoint.keep=2 --overwrite; then
    check small-fsdp2-final $PY benchmarks/gpu_distributed_checks.py final "$WORK/small-fsdp2" --frozen-like "$WORK/small-rtn"
    check small-fsdp2-vs-gpu1 $PY benchmarks/gpu_distributed_checks.py compare "$WORK/small-gpu1" "$WORK/small-fsdp2" \
      --loss-rtol 0.05 --ppl-rtol 0.02
    if cut_to "$WORK/small-fsdp2" "$WORK/small-fsdp2-cut" 30; then
      check small-fsdp2-resume launch "${FSDP[@]}" -m qat train "${SMALL[@]}" "output_dir=$WORK/small-fsdp2-cut" \
        train.max_steps=60 checkpoint.every=30 checkpoint.keep=2 checkpoint.resume=auto \
        && check small-fsdp2-resume-parity $PY benchmarks/gpu_distributed_checks.py compare "$WORK/small-fsdp2" \
             "$WORK/small-fsdp2-cut" --loss-rtol 0.01 --ppl-rtol 0.005 --from-step 30
    else
      record FAIL small-fsdp2-resume "no step-30 checkpoint in $WORK/small-fsdp2/checkpoints"
    fi
  fi
fi

if [[ " $PARTS " == *" 1b "* ]]; then
  M1B=$WORK/llama-1b-random
  [ -f "$M1B/config.json" ] || check make-1b $PY benchmarks/gpu_distributed_checks.py make-1b "$M1B" --tokenizer "$TOK"
  B1=(recipes/small/w4g128.yaml "model.path=$M1B" "model.dtype=float32" "teacher.dtype=bfloat16" "${DATA[@]}"
      "freeze.policy=ov-freeze" "data.seq_len=512" "data.max_train_tokens=262144" "data.max_valid_tokens=16384"
      "train.micro_batch_size=4" "train.log_every=1" "train.warmup_steps=2" "eval.every=0" "eval.max_batches=4"
      "eval.batch_size=4" "tracking.wandb_project=null")
  check 1b-fsdp2-probe launch "${FSDP[@]}" benchmarks/gpu_distributed_checks.py probe "${B1[@]}" "output_dir=$WORK/probe-1b"
  if check 1b-fsdp2 launch "${FSDP[@]}" -m qat train "${B1[@]}" "output_dir=$WORK/1b-fsdp2" train.max_steps=20 \
       checkpoint.every=10 checkpoint.keep=2 --overwrite; then
    check 1b-fsdp2-metrics rows_at_least "$WORK/1b-fsdp2" 20
    check 1b-fsdp2-final $PY benchmarks/gpu_distributed_checks.py final "$WORK/1b-fsdp2"
    if cut_to "$WORK/1b-fsdp2" "$WORK/1b-fsdp2-cut" 10; then
      check 1b-fsdp2-resume launch "${FSDP[@]}" -m qat train "${B1[@]}" "output_dir=$WORK/1b-fsdp2-cut" train.max_steps=20 \
        checkpoint.every=10 checkpoint.keep=2 checkpoint.resume=auto \
        && check 1b-fsdp2-resume-parity $PY benchmarks/gpu_distributed_checks.py compare "$WORK/1b-fsdp2" "$WORK/1b-fsdp2-cut" \
             --loss-rtol 0.01 --ppl-rtol 0.01 --from-step 10
    fi
  fi
fi

if [[ " $PARTS " == *" deepspeed "* ]]; then
  if $PY -c "import deepspeed" >/dev/null 2>&1; then
    check deepspeed-zero2 launch launch/deepspeed-zero2.yaml -m qat train "${SMALL[@]}" "output_dir=$WORK/ds-zero2" \
      train.max_steps=10 --overwrite && check deepspeed-zero2-metrics rows_at_least "$WORK/ds-zero2" 10
  else
    record SKIP deepspeed-zero2 "deepspeed is not importable here (carry its sdist, see the header)"
  fi
fi

echo "== PASS $PASS  FAIL $FAIL  SKIP $SKIP" | tee -a "$RESULTS/summary.txt"
exit "$FAIL"
