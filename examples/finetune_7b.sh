#!/usr/bin/env bash
""":"
# Supervised fine-tuning of LLaMA-2-7B from a pretrained checkpoint, with the launcher and
# layout of pretrain_7b.sh (TP=8 in a node, PP/DP across nodes, bf16, ZeRO-1, SP).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 SFT_DATA=/data/chat.jsonl \
#       PRETRAINED_CHECKPOINT=~/engine-runs/llama2-7b/checkpoints \
#       TOKENIZER_MODEL=/models/tokenizer.model bash examples/finetune_7b.sh
# or `torchrun [its options] examples/finetune_7b.sh [flags]`.
#
# SFT_DATA is chat JSONL ({"messages": [...]} or {"prompt", "response"}) or the prefix written
# by `python -m engine.data.sft_dataset`. The first start takes the weights of
# PRETRAINED_CHECKPOINT (default: pretrain_7b.sh's checkpoints; fresh optimizer and schedule);
# once the run has saved, every start (a torchrun restart, MAX_RESTARTS, or a resubmission)
# resumes from FINETUNE_DIR. Outputs go to OUTPUT_DIR (default ~/engine-runs/llama2-7b-sft).
# Paths are the caller's; flags after the script override the recipe's; DRY_RUN=1 plans and
# checks the inputs. Read by bash and by Python, as pretrain_7b.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_env.sh"

SFT_DATA="${SFT_DATA:-data/sft.jsonl}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-tokenizer.model}"
PRETRAINED_CHECKPOINT="${PRETRAINED_CHECKPOINT:-$HOME/engine-runs/llama2-7b/checkpoints}"
OUTPUT_DIR="${OUTPUT_DIR:-$HOME/engine-runs/llama2-7b-sft}"
FINETUNE_DIR="${FINETUNE_DIR:-$OUTPUT_DIR/checkpoints}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$OUTPUT_DIR/tensorboard}"
TP="${TP:-$(( GPUS_PER_NODE < 8 ? GPUS_PER_NODE : 8 ))}"
PP_GIVEN="${PP:+1}"
PP="${PP:-$(( NNODES % 2 == 0 ? 2 : 1 ))}"
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-1}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-128}"
TRAIN_ITERS="${TRAIN_ITERS:-2000}"

ARGS=(
    --model-preset llama2-7b
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --sequence-parallel --recompute-granularity selective
    --bf16 --use-distributed-optimizer --overlap-grad-reduce
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --seq-length 4096
    --lr 2e-5 --min-lr 0 --lr-decay-style cosine --lr-warmup-iters 50
    --weight-decay 0.0 --adam-beta2 0.95 --clip-grad 1.0 --train-iters "$TRAIN_ITERS"
    --sft --data-path "$SFT_DATA" --chat-template llama2 --split 98,2,0
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL"
    --load "$PRETRAINED_CHECKPOINT" --save "$FINETUNE_DIR" --save-interval 200
    --eval-interval 200 --eval-iters 10 --log-interval 10
    --tensorboard-dir "$TENSORBOARD_DIR"
)
say "outputs: checkpoints in $FINETUNE_DIR, tensorboard in $TENSORBOARD_DIR"
launch "$RECIPE_DIR/pretrain.py" "${ARGS[@]}" "$@"
exit
":"""
import os, sys  # noqa: E401, E402  (Python starts here: what torchrun runs on every rank)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe import run_recipe  # noqa: E402

sys.exit(run_recipe(__file__))
