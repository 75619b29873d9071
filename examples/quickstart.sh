#!/usr/bin/env bash
# The CPU quickstart: a tiny LLaMA trained for a few steps under tensor parallelism (TP=2,
# sequence parallel) on two gloo processes. Needs no GPU, no data and no download.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node 2 examples/pretrain.py \
    --model-preset tiny --tensor-model-parallel-size 2 --sequence-parallel \
    --micro-batch-size 4 --seq-length 64 --train-iters 30 --log-interval 5 "$@"
