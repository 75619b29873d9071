"""Perplexity of a checkpoint on a JSONL file or an indexed dataset, at any layout.

    torchrun --nproc-per-node 2 tools/evaluate.py --load ckpt/llama2-7b \
        --tensor-model-parallel-size 2 --data-path valid.jsonl --json-keys text \
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model \
        --seq-length 4096 --stride 2048

``--data-path`` is a ``.jsonl`` file (tokenized here) or the prefix of a ``.bin/.idx`` pair
(already tokenized). The tokenizer defaults to the one the checkpoint's training run used.
Prints one line: ``perplexity X | nll/token Y | tokens N | windows W``. See
docs/conversion.md (Evaluation) and `engine.inference.perplexity`.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from engine import parallel_state
from engine.device import init_distributed, leave_distributed
from engine.inference.loading import load_model, load_tokenizer
from engine.inference.perplexity import evaluate_perplexity, read_documents
from engine.models.families import add_model_provider_flag


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (any layout)")
    parser.add_argument("--ckpt-step", type=int, default=None, help="iteration (default: latest)")
    parser.add_argument("--data-path", required=True, help=".jsonl file or indexed dataset prefix")
    parser.add_argument("--json-keys", nargs=1, default=["text"], help="JSONL key of the text")
    parser.add_argument("--tokenizer-type", default=None, help="default: the checkpoint's run's")
    parser.add_argument("--tokenizer-model", default=None, help="default: the checkpoint's run's")
    parser.add_argument("--seq-length", type=int, required=True, help="window length in tokens")
    parser.add_argument("--stride", type=int, default=None, help="window step (default: seq)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="windows per forward")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    add_model_provider_flag(parser)  # a checkpoint of a family of your own
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    init_distributed()
    parallel_state.initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    )
    try:
        tokenizer = load_tokenizer(
            args.load, args.ckpt_step, args.tokenizer_type, args.tokenizer_model
        )
        documents = read_documents(args.data_path, tokenizer, args.json_keys[0])
        model = load_model(args.load, args.ckpt_step)
        result = evaluate_perplexity(
            model,
            documents,
            args.seq_length,
            args.stride or args.seq_length,
            args.micro_batch_size,
        )
        if dist.get_rank() == 0:
            print(
                f"perplexity {result.perplexity:.6f} | nll/token "
                f"{result.nll_sum / result.tokens:.6f} | tokens {result.tokens} | "
                f"windows {result.windows}"
            )
    finally:
        parallel_state.destroy_model_parallel()
        leave_distributed(together=sys.exc_info()[1] is None)  # no barrier if a rank failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
