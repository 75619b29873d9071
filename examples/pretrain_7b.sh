#!/usr/bin/env bash
# LLaMA-2-7B pretraining on NNODES nodes of 8 GPUs: TP=8 inside each node (its NVLink), PP and
# DP across nodes, bf16 with the distributed optimizer (ZeRO-1), sequence parallelism and
# selective recomputation, global batch 1024 x 4096 tokens (4M tokens a step).
#
# On every node (or under srun, see slurm_pretrain_7b.sbatch):
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 DATA_PATH=/data/corpus_text_document \
#       TOKENIZER_MODEL=/models/llama2/tokenizer.model bash examples/pretrain_7b.sh
#
# PP defaults to 2 on an even number of nodes (1 otherwise); DP is what remains:
# NNODES x 8 / (8 x PP). Restarting the same command resumes from CHECKPOINT_DIR.
# DRY_RUN=1 prints the memory plan instead. Extra arguments are passed to examples/pretrain.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/launch_env.sh

DATA_PATH="${DATA_PATH:-data/corpus_text_document}"  # or a blend: "0.7 web 0.3 code"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-tokenizer.model}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-checkpoints/llama2-7b}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-tensorboard/llama2-7b}"
TP="${TP:-8}"
PP="${PP:-$(( NNODES % 2 == 0 ? 2 : 1 ))}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-1024}"
TRAIN_ITERS="${TRAIN_ITERS:-500000}"  # ~2T tokens at 4M tokens a step
EXIT_DURATION_MINS="${EXIT_DURATION_MINS:-}"  # e.g. a time limit minus the time to save

ARGS=(
    --model-preset llama2-7b
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --sequence-parallel --recompute-granularity selective
    --bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
    --micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH_SIZE" --seq-length 4096
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --train-iters "$TRAIN_ITERS"
    --data-path $DATA_PATH --split 949,50,1
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL"
    --eval-interval 1000 --eval-iters 10 --log-interval 10
    --save "$CHECKPOINT_DIR" --save-interval 1000 --keep-last-n 3
    --tensorboard-dir "$TENSORBOARD_DIR"
    $(resume_args "$CHECKPOINT_DIR")
)
if [[ -n "$EXIT_DURATION_MINS" ]]; then
    ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_MINS")
fi
launch "${ARGS[@]}" "$@"
