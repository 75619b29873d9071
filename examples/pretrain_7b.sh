#!/usr/bin/env bash
""":"
# LLaMA-2-7B pretraining on NNODES nodes of 8 GPUs: TP=8 inside each node (its NVLink), PP and
# DP across nodes, bf16 with the distributed optimizer (ZeRO-1), sequence parallelism and
# selective recomputation, global batch 1024 x 4096 tokens (4M tokens a step).
#
# On every node (or under srun, see slurm_pretrain_7b.sbatch), from any directory:
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 DATA_PATH=/data/corpus_text_document \
#       TOKENIZER_MODEL=/models/llama2/tokenizer.model bash examples/pretrain_7b.sh
# or, with torchrun's own options (the layout is then torchrun's):
#   torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 \
#       examples/pretrain_7b.sh [flags]
#
# PP defaults to 2 on an even number of nodes (1 otherwise); DP is what remains:
# NNODES x 8 / (8 x PP). Paths are the caller's: relative ones are taken from the directory the
# command is typed in. Outputs go to OUTPUT_DIR (default ~/engine-runs/llama2-7b): checkpoints
# in CHECKPOINT_DIR, TensorBoard in TENSORBOARD_DIR. Every start loads CHECKPOINT_DIR (--load =
# --save), so a first start trains from scratch and any restart resumes; torchrun restarts a
# failed worker group up to MAX_RESTARTS (3) times. Flags after the script override the
# recipe's (the last one wins). DRY_RUN=1 prints the memory plan and checks the inputs instead.
#
# This file is read by bash and by Python (torchrun runs it with Python, see
# examples/recipe.py): the bash part is this string, and ends with `exit`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_env.sh"

DATA_PATH="${DATA_PATH:-data/corpus_text_document}"  # or a blend: "0.7 web 0.3 code"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-tokenizer.model}"
OUTPUT_DIR="${OUTPUT_DIR:-$HOME/engine-runs/llama2-7b}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-$OUTPUT_DIR/checkpoints}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$OUTPUT_DIR/tensorboard}"
TP="${TP:-$(( GPUS_PER_NODE < 8 ? GPUS_PER_NODE : 8 ))}"
PP_GIVEN="${PP:+1}"
PP="${PP:-$(( NNODES % 2 == 0 ? 2 : 1 ))}"
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-1}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-1024}"
TRAIN_ITERS="${TRAIN_ITERS:-500000}"  # ~2T tokens at 4M tokens a step
EXIT_DURATION_MINS="${EXIT_DURATION_MINS:-}"  # e.g. a time limit minus the time to save

read -r -a DATA_PATH_ARGS <<< "$DATA_PATH"
ARGS=(
    --model-preset llama2-7b
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --sequence-parallel --recompute-granularity selective
    --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --seq-length 4096
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --train-iters "$TRAIN_ITERS"
    --data-path "${DATA_PATH_ARGS[@]}" --split 949,50,1
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL"
    --eval-interval 1000 --eval-iters 10 --log-interval 10
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000 --keep-last-n 3
    --tensorboard-dir "$TENSORBOARD_DIR"
)
if [[ -n "$EXIT_DURATION_MINS" ]]; then
    ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_MINS")
fi
say "outputs: checkpoints in $CHECKPOINT_DIR, tensorboard in $TENSORBOARD_DIR"
launch "$RECIPE_DIR/pretrain.py" "${ARGS[@]}" "$@"
exit
":"""
import os, sys  # noqa: E401, E402  (Python starts here: what torchrun runs on every rank)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe import run_recipe  # noqa: E402

sys.exit(run_recipe(__file__))
