#!/usr/bin/env bash
# The CPU quickstart (`make quickstart`): the whole pipeline on one machine, nothing downloaded.
#
#   1. a corpus from text that ships with Python (pydoc_data), and a SentencePiece tokenizer
#      trained on it (examples/quickstart_data.py);
#   2. tools/preprocess_data.py -> .bin/.idx, as for any Megatron corpus;
#   3. a tiny LLaMA trained with TP=2 x PP=2 x DP=2 (8 gloo processes), sequence parallel,
#      the distributed optimizer, evaluation on the validation split; it stops at iteration
#      $STOP with a checkpoint (--exit-interval), as a pre-empted job would;
#   4. a second launch resumes from the checkpoint to iteration $ITERS, evaluates and saves;
#      tools/plot_run.py draws both launches' TensorBoard scalars into $OUT/run.png.
#
# Settings (environment): QUICKSTART_DIR (default /tmp/engine-quickstart), QUICKSTART_ITERS
# (300), QUICKSTART_STOP (250), NPROC (8: TP=2 x PP=2 x DP=2). Extra arguments go to both
# training launches (e.g. --log-interval 10).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${QUICKSTART_DIR:-${TMPDIR:-/tmp}/engine-quickstart}"
ITERS="${QUICKSTART_ITERS:-300}"
STOP="${QUICKSTART_STOP:-250}"
NPROC="${NPROC:-8}"
PYTHON="${PYTHON:-python3}"
# Eight processes share the cores: one thread each, or they fight over them.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
start=$(date +%s)

echo "== 1/4 corpus and tokenizer -> $OUT"
mkdir -p "$OUT"
rm -rf "$OUT/checkpoints" "$OUT/tensorboard" "$OUT/data" "$OUT/run.png"
"$PYTHON" examples/quickstart_data.py --output-dir "$OUT" --vocab-size 2000

echo "== 2/4 preprocess"
"$PYTHON" tools/preprocess_data.py --input "$OUT/pydoc_topics.jsonl" \
    --output-prefix "$OUT/data/pydoc" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2

TRAIN=(
    examples/pretrain.py
    --model-preset tiny --num-layers 4
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel
    --use-distributed-optimizer --overlap-grad-reduce
    --micro-batch-size 4 --global-batch-size 16 --seq-length 128
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20
    --weight-decay 0.1 --clip-grad 1.0 --train-iters "$ITERS"
    --data-path "$OUT/data/pydoc_text_document" --split 95,4,1 --num-workers 0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model"
    --eval-interval 100 --eval-iters 4 --log-interval 25
    --save "$OUT/checkpoints" --tensorboard-dir "$OUT/tensorboard"
)

echo "== 3/4 train to iteration $STOP on $NPROC processes, then stop with a checkpoint"
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "${TRAIN[@]}" \
    --exit-interval "$STOP" "$@" | tee "$OUT/train.log"

echo "== 4/4 resume from the checkpoint to iteration $ITERS"
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "${TRAIN[@]}" \
    --load "$OUT/checkpoints" "$@" | tee "$OUT/resume.log"

first=$(grep -m1 -o 'loss [0-9.E+-]*' "$OUT/train.log" | cut -d' ' -f2)
last=$(grep '^iteration' "$OUT/resume.log" | tail -1 | grep -o 'loss [0-9.E+-]*' | cut -d' ' -f2)
valid=$(grep '^validation' "$OUT/resume.log" | tail -1 | sed 's/.*| loss //')
"$PYTHON" tools/plot_run.py "$OUT/tensorboard" --output "$OUT/run.png"
cat <<EOF

== quickstart done in $(( $(date +%s) - start )) s
training loss: $first (first logged) -> $last (iteration $ITERS)
validation:    loss $valid
checkpoints:   $OUT/checkpoints (latest: iteration $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt"))
tensorboard:   tensorboard --logdir $OUT/tensorboard
plot:          $OUT/run.png
EOF
