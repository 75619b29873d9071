"""Evaluate a checkpoint at any layout: perplexity on a corpus, or a scored generation task.

    torchrun --nproc-per-node 2 tools/evaluate.py --load ckpt/llama2-7b \
        --tensor-model-parallel-size 2 --data-path valid.jsonl --json-keys text \
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model \
        --seq-length 4096 --stride 2048
    torchrun --nproc-per-node 2 tools/evaluate.py --task generation --load ckpt/llama2-7b \
        --tensor-model-parallel-size 2 --data-path qa.jsonl --metric exact_match,accuracy \
        --max-new-tokens 16 --output qa_outputs.jsonl

``--task perplexity`` (the default): ``--data-path`` is a ``.jsonl`` file (tokenized here) or
the prefix of a ``.bin/.idx`` pair (already tokenized); prints ``perplexity X | nll/token Y |
tokens N | windows W`` (`engine.inference.perplexity`).

``--task generation``: ``--data-path`` is JSONL, ``{"prompt", "answer"}`` a line (``answer``:
a string or a list of acceptable ones), or ``{"prompt"}`` lines with ``--references FILE``
(one reference a line); the prompts are decoded with the flags of `tools/generate.py` and
scored with ``--metric`` (a comma list of bleu, chrf, exact_match, accuracy;
`engine.inference.scoring`). ``--output FILE.jsonl`` gets one line per example (prompt,
output, answer or reference, its scores) and ``FILE.jsonl.scores.json`` the corpus scores;
prints ``bleu X | chrf Y | exact_match Z | examples N``.

The tokenizer defaults to the one the checkpoint's training run used. Progress (windows or
prompts done, rate, ETA) goes to stderr. See docs/conversion.md (Evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from engine import parallel_state
from engine.data.tokenizer import Tokenizer
from engine.device import init_distributed, leave_distributed
from engine.inference.decoding import (
    add_decoding_flags,
    completion,
    decode_batches,
    encode,
    gather_replicas,
    prompts_decoded_by,
    sampling_params,
)
from engine.inference.loading import load_model, load_tokenizer
from engine.inference.perplexity import evaluate_perplexity, read_documents
from engine.inference.scoring import (
    Example,
    corpus_scores,
    example_scores,
    parse_metrics,
    read_examples,
)
from engine.models.families import add_model_provider_flag
from engine.progress import Progress


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task", choices=["perplexity", "generation"], default="perplexity",
        help="perplexity of a corpus, or generation scored against answers / references",
    )  # fmt: skip
    parser.add_argument("--load", required=True, help="checkpoint directory (any layout)")
    parser.add_argument("--ckpt-step", type=int, default=None, help="iteration (default: latest)")
    parser.add_argument(
        "--data-path", required=True,
        help=".jsonl file or indexed dataset prefix (generation: JSONL of prompts)",
    )  # fmt: skip
    parser.add_argument("--tokenizer-type", default=None, help="default: the checkpoint's run's")
    parser.add_argument("--tokenizer-model", default=None, help="default: the checkpoint's run's")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    add_model_provider_flag(parser)  # a checkpoint of a family of your own
    perplexity = parser.add_argument_group("--task perplexity")
    perplexity.add_argument("--json-keys", nargs=1, default=["text"], help="JSONL key of the text")
    perplexity.add_argument("--seq-length", type=int, default=None, help="window length (tokens)")
    perplexity.add_argument("--stride", type=int, default=None, help="window step (default: seq)")
    generation = parser.add_argument_group("--task generation")
    generation.add_argument(
        "--references", default=None,
        help="one reference per line, for the prompts of --data-path in order",
    )  # fmt: skip
    generation.add_argument(
        "--metric", default="exact_match,accuracy",
        help="comma list of bleu, chrf, exact_match, accuracy (default: exact_match,accuracy)",
    )  # fmt: skip
    generation.add_argument(
        "--stop-at-newline", action="store_true",
        help="cut each output at its first newline before scoring (QA: one-line answers)",
    )  # fmt: skip
    generation.add_argument(
        "--output", default=None,
        help="JSONL of the per-example outputs and scores (and OUTPUT.scores.json)",
    )  # fmt: skip
    add_decoding_flags(
        parser, "prompts per generate call (default 8); --task perplexity: windows per "
        "forward (default 1)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every input is checked before the process group and the model.
    examples: list[Example] = []
    metrics: list[str] = []
    try:
        sampling_params(args)
        if args.task == "perplexity" and args.seq_length is None:
            raise ValueError("--task perplexity needs --seq-length (the window, in tokens)")
        if args.task == "generation":
            metrics = parse_metrics(args.metric)
            examples = read_examples(args.data_path, args.references)
            if args.output:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    except ValueError as error:  # ScoringError too
        parser.error(str(error))
    except OSError as error:
        parser.error(f"--output {args.output}: cannot create its directory ({error})")
    init_distributed()
    parallel_state.initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    )
    try:
        tokenizer = load_tokenizer(
            args.load, args.ckpt_step, args.tokenizer_type, args.tokenizer_model
        )
        if args.task == "perplexity":
            _perplexity(args, tokenizer)
        else:
            _generation(args, tokenizer, examples, metrics)
    finally:
        parallel_state.destroy_model_parallel()
        leave_distributed(together=sys.exc_info()[1] is None)  # no barrier if a rank failed
    return 0


def _perplexity(args: argparse.Namespace, tokenizer: Tokenizer | None) -> None:
    documents = read_documents(args.data_path, tokenizer, args.json_keys[0])
    model = load_model(args.load, args.ckpt_step)
    # This rank's windows (the DP ranks share them out); the total is known once they are cut.
    progress = Progress(unit="windows", label="perplexity", enabled=dist.get_rank() == 0)

    def windows_done(done: int, total: int) -> None:
        progress.set_total(total)
        progress.update(done)

    result = evaluate_perplexity(
        model,
        documents,
        args.seq_length,
        args.stride or args.seq_length,
        args.micro_batch_size or 1,
        on_windows=windows_done,
    )
    progress.close()
    if dist.get_rank() == 0:
        print(
            f"perplexity {result.perplexity:.6f} | nll/token "
            f"{result.nll_sum / result.tokens:.6f} | tokens {result.tokens} | "
            f"windows {result.windows}"
        )


def _generation(
    args: argparse.Namespace,
    tokenizer: Tokenizer | None,
    examples: list[Example],
    metrics: list[str],
) -> None:
    if tokenizer is None:
        raise SystemExit(f"{args.load} records no tokenizer: give --tokenizer-type/-model")
    prompts = [encode(tokenizer, e.prompt, not args.no_bos) for e in examples]
    model = load_model(args.load, args.ckpt_step)
    rank0 = dist.get_rank() == 0
    # The data-parallel replicas deal the batches out; rank 0 shows its own share.
    replica = (parallel_state.get_data_parallel_rank(),
               parallel_state.get_data_parallel_world_size())  # fmt: skip
    share = prompts_decoded_by(replica, len(prompts), args)
    progress = Progress(share, "prompts", label="generation", enabled=rank0)
    decoded = decode_batches(
        model,
        prompts,
        args,
        [tokenizer.eod],
        pad_id=tokenizer.pad if tokenizer.pad is not None else tokenizer.eod,
        on_batch=lambda start, size: progress.update(advance=size),
        replica=replica,
    )
    progress.close()
    new = gather_replicas(decoded, args, parallel_state.get_data_parallel_group())
    if not rank0 or new is None:
        return
    stops = set() if args.ignore_eos else {tokenizer.eod}
    outputs = []
    for prompt, ids in zip(prompts, new, strict=True):
        ids = ids[:-1] if ids and ids[-1] in stops else ids  # the stop is not part of the text
        text = completion(tokenizer, prompt, ids)
        outputs.append(text.split("\n", 1)[0] if args.stop_at_newline else text)
    scores = corpus_scores(outputs, examples, metrics)
    if args.output:
        _write_outputs(args, examples, outputs, metrics, scores)
    print(" | ".join([f"{m} {scores[m]:.6f}" for m in metrics] + [f"examples {len(examples)}"]))


def _write_outputs(
    args: argparse.Namespace,
    examples: list[Example],
    outputs: list[str],
    metrics: list[str],
    scores: dict[str, float],
) -> None:
    """``--output``: a JSONL line per example and ``{output}.scores.json``."""
    key = "reference" if args.references else "answer"
    path = Path(args.output)
    with open(path, "w", encoding="utf-8") as out:
        for example, output in zip(examples, outputs, strict=True):
            record: dict[str, Any] = {"prompt": example.prompt, "output": output}
            record[key] = example.given
            record.update(example_scores(output, example.answers, metrics))
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {**scores, "examples": len(examples), "data_path": args.data_path,
               "references": args.references, "load": args.load}  # fmt: skip
    Path(f"{path}.scores.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
