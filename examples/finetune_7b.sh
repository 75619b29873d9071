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

OUTPUT_DIR="${OUTPUT_DIR:-$HOME/engine-runs/llama2-7b-sft}"
FINETUNE_DIR="${FINETUNE_DIR:-$OUTPUT_DIR/checkpoints}"
source "$RECIPE_DIR/finetune_env.sh"  # the inputs and the flags shared with finetune_lora_7b.sh
TP="${TP:-$(( GPUS_PER_NODE < 8 ? GPUS_PER_NODE : 8 ))}"
PP_GIVEN="${PP:+1}"
PP="${PP:-$(( NNODES % 2 == 0 ? 2 : 1 ))}"

ARGS=(
    "${FINETUNE_ARGS[@]}"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel
    --lr 2e-5 --load "$PRETRAINED_CHECKPOINT" --save "$FINETUNE_DIR"
)
say "outputs: checkpoints in $FINETUNE_DIR, tensorboard in $TENSORBOARD_DIR"
launch "$RECIPE_DIR/pretrain.py" "${ARGS[@]}" "$@"
exit
":"""
import os, sys  # noqa: E401, E402  (Python starts here: what torchrun runs on every rank)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe import run_recipe  # noqa: E402

sys.exit(run_recipe(__file__))
