#!/usr/bin/env bash
# Supervised fine-tuning of LLaMA-2-7B from a pretrained checkpoint, with the launcher and
# layout of pretrain_7b.sh (TP=8 in a node, PP/DP across nodes, bf16, ZeRO-1, SP).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 SFT_DATA=/data/chat.jsonl \
#       PRETRAINED_CHECKPOINT=checkpoints/llama2-7b TOKENIZER_MODEL=/models/tokenizer.model \
#       bash examples/finetune_7b.sh
#
# SFT_DATA is chat JSONL ({"messages": [...]} or {"prompt", "response"}) or the prefix written
# by `python -m engine.data.sft_dataset`. The first start takes the weights of
# PRETRAINED_CHECKPOINT (fresh optimizer and schedule); a restart resumes from FINETUNE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/launch_env.sh

SFT_DATA="${SFT_DATA:-data/sft.jsonl}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-tokenizer.model}"
PRETRAINED_CHECKPOINT="${PRETRAINED_CHECKPOINT:-checkpoints/llama2-7b}"
FINETUNE_DIR="${FINETUNE_DIR:-checkpoints/llama2-7b-sft}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-tensorboard/llama2-7b-sft}"
TP="${TP:-8}"
PP="${PP:-$(( NNODES % 2 == 0 ? 2 : 1 ))}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-128}"
TRAIN_ITERS="${TRAIN_ITERS:-2000}"

launch \
    --model-preset llama2-7b \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --sequence-parallel --recompute-granularity selective \
    --bf16 --use-distributed-optimizer --overlap-grad-reduce \
    --micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH_SIZE" --seq-length 4096 \
    --lr 2e-5 --min-lr 0 --lr-decay-style cosine --lr-warmup-iters 50 \
    --weight-decay 0.0 --adam-beta2 0.95 --clip-grad 1.0 --train-iters "$TRAIN_ITERS" \
    --sft --data-path "$SFT_DATA" --chat-template llama2 --split 98,2,0 \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --load "$PRETRAINED_CHECKPOINT" --save "$FINETUNE_DIR" --save-interval 200 \
    --eval-interval 200 --eval-iters 10 --log-interval 10 \
    --tensorboard-dir "$TENSORBOARD_DIR" "$@"
