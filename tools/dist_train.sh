#!/usr/bin/env bash
# Multi-process training with torchrun through mmengine's distributed support.
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]
# GPUs: one process per GPU (nccl). CPU-only machines: gloo on the loopback interface.
set -euo pipefail
CONFIG=$1
NPROCS=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
if [ -x "$repo/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then PY="$repo/.venv/bin/python"; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$NPROCS" --master_port="$PORT" \
  "$repo/tools/train.py" "$CONFIG" --launcher pytorch "$@"
