# Sourced by the fine-tuning recipes (finetune_7b.sh, finetune_lora_7b.sh) after launch_env.sh
# and after they set OUTPUT_DIR: their inputs, batch and length, and FINETUNE_ARGS, the flags
# they share. Each recipe adds its own layout, learning rate and checkpoint directories.
#
#   SFT_DATA               chat JSONL ({"messages": [...]} or {"prompt", "response"}), or the
#                          prefix written by `python -m engine.data.sft_dataset`
#   TOKENIZER_MODEL        the SentencePiece model (Llama2Tokenizer)
#   PRETRAINED_CHECKPOINT  the weights fine-tuned (default: pretrain_7b.sh's checkpoints)
#   TENSORBOARD_DIR        ($OUTPUT_DIR/tensorboard)
#   MICRO_BATCH_SIZE (1), GLOBAL_BATCH_SIZE (128), TRAIN_ITERS (2000)

SFT_DATA="${SFT_DATA:-data/sft.jsonl}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-tokenizer.model}"
PRETRAINED_CHECKPOINT="${PRETRAINED_CHECKPOINT:-$HOME/engine-runs/llama2-7b/checkpoints}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$OUTPUT_DIR/tensorboard}"
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-1}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-128}"
TRAIN_ITERS="${TRAIN_ITERS:-2000}"

FINETUNE_ARGS=(
    --model-preset llama2-7b --recompute-granularity selective
    --bf16 --use-distributed-optimizer --overlap-grad-reduce
    --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
    --seq-length 4096
    --min-lr 0 --lr-decay-style cosine --lr-warmup-iters 50
    --weight-decay 0.0 --adam-beta2 0.95 --clip-grad 1.0 --train-iters "$TRAIN_ITERS"
    --sft --data-path "$SFT_DATA" --chat-template llama2 --split 98,2,0
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL"
    --save-interval 200 --eval-interval 200 --eval-iters 10 --log-interval 10
    --tensorboard-dir "$TENSORBOARD_DIR"
)
