#!/usr/bin/env bash
# Two-node launch: run on every node with its rank, e.g. under SLURM:
#   srun --nodes 2 --ntasks-per-node 1 bash launch/multinode.sh recipes/llama2-7b-chat/w4-ovfreeze-kd.yaml
# or by hand: MACHINE_RANK=0 MAIN_IP=10.0.0.1 bash launch/multinode.sh RECIPE   (and MACHINE_RANK=1 on the other)
set -euo pipefail
RECIPE=${1:?usage: multinode.sh RECIPE [dotted.key=value ...]}; shift
RANK=${MACHINE_RANK:-${SLURM_NODEID:-0}}
MAIN_IP=${MAIN_IP:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n1)}
exec accelerate launch --config_file "$(dirname "$0")/fsdp2-2node.yaml" \
  --machine_rank "$RANK" --main_process_ip "$MAIN_IP" \
  -m qat train "$RECIPE" "$@"
