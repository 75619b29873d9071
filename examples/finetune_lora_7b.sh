#!/usr/bin/env bash
""":"
# LoRA supervised fine-tuning of LLaMA-2-7B: adapters of rank LORA_RANK (16, alpha LORA_ALPHA
# 32) on every projection (LORA_TARGET_MODULES) of a frozen base. Only the adapters train, so
# the 7B fits on far fewer GPUs a replica than finetune_7b.sh: TP=2 (at most the node's GPUs),
# PP=1, DP the rest, bf16, ZeRO-1 over the adapters' optimizer state, sequence parallelism
# when TP > 1.
#
#   NNODES=1 SFT_DATA=/data/chat.jsonl PRETRAINED_CHECKPOINT=~/engine-runs/llama2-7b/checkpoints \
#       TOKENIZER_MODEL=/models/tokenizer.model bash examples/finetune_lora_7b.sh
# or `torchrun [its options] examples/finetune_lora_7b.sh [flags]`.
#
# PRETRAINED_CHECKPOINT is an engine checkpoint (default: pretrain_7b.sh's checkpoints;
# tools/convert_checkpoint.py writes one from HF weights), loaded by every start. LORA_DIR
# holds the adapters only (--load = --save): the first start finds nothing there and trains
# new adapters, every later one (a torchrun restart, MAX_RESTARTS, or a resubmission) resumes
# them with their optimizer state; adapters saved on another base are refused. The inputs
# and the other variables are finetune_7b.sh's (finetune_env.sh). Outputs go to OUTPUT_DIR
# (default ~/engine-runs/llama2-7b-lora). Paths are the caller's; flags after the script
# override the recipe's; DRY_RUN=1 plans and checks the inputs. Read by bash and by Python,
# as pretrain_7b.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_env.sh"

OUTPUT_DIR="${OUTPUT_DIR:-$HOME/engine-runs/llama2-7b-lora}"
LORA_DIR="${LORA_DIR:-$OUTPUT_DIR/adapters}"
source "$RECIPE_DIR/finetune_env.sh"
LORA_RANK="${LORA_RANK:-16}"
LORA_ALPHA="${LORA_ALPHA:-32}"
LORA_DROPOUT="${LORA_DROPOUT:-0}"
LORA_TARGET_MODULES="${LORA_TARGET_MODULES:-qkv,out,gate_up,down}"
TP="${TP:-$(( GPUS_PER_NODE < 2 ? GPUS_PER_NODE : 2 ))}"
PP="${PP:-1}"
PP_GIVEN=1  # PP does not follow the node count here: check_layout suggests nodes at this PP

ARGS=(
    "${FINETUNE_ARGS[@]}"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --lr 1e-4
    --lora-rank "$LORA_RANK" --lora-alpha "$LORA_ALPHA" --lora-dropout "$LORA_DROPOUT"
    --lora-target-modules "$LORA_TARGET_MODULES"
    --pretrained-checkpoint "$PRETRAINED_CHECKPOINT" --load "$LORA_DIR" --save "$LORA_DIR"
)
# Sequence parallelism shards along TP, and the flag cannot be undone after the script: set it
# from the TP that counts, the last one given.
if (( $(last_flag --tensor-model-parallel-size "$TP" "$@") > 1 )); then
    ARGS+=(--sequence-parallel)
fi
say "outputs: adapters in $LORA_DIR, tensorboard in $TENSORBOARD_DIR"
launch "$RECIPE_DIR/pretrain.py" "${ARGS[@]}" "$@"
exit
":"""
import os, sys  # noqa: E401, E402  (Python starts here: what torchrun runs on every rank)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe import run_recipe  # noqa: E402

sys.exit(run_recipe(__file__))
