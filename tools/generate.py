"""Continue prompts with a checkpoint at any layout, streaming the text as it is decoded.

    torchrun --nproc-per-node 4 tools/generate.py --load ckpt/llama2-7b \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --prompt "The capital of France is" --max-new-tokens 64 \
        --temperature 0.8 --top-p 0.95 --seed 1234

The model's architecture comes from the checkpoint's ``metadata.json``; the tokenizer defaults
to the one its training run (or its conversion from HuggingFace) recorded. Prompts come from
``--prompt`` (repeatable) or ``--prompts-file`` (one per line); they are decoded together as
one left-padded batch. A single prompt streams token by token; several print as each finishes.
``--temperature 0`` (the default) is greedy.

``--chat`` talks to a chat model: each ``--prompt`` is one user message, and
``--prompts-file`` is JSONL with one conversation a line, ``{"messages": [{"role": ...,
"content": ...}, ...]}`` (the SFT data format, ending where the model should reply). Each is
rendered with the chat template of ``--chat-template`` (default ``auto``: the Jinja template
shipped with the tokenizer; or a ``.jinja`` file, or a built-in name) with the generation
prompt after it, and decoding stops at the template's end of turn (EOS, ``eos_token`` and the
token that ends an assistant turn, e.g. ``<|eot_id|>`` or ``<|im_end|>``). See
docs/generation.md and `engine.inference.generation`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from engine import parallel_state
from engine.data.chat_template import AUTO, JinjaChatTemplate, encode_prompt, stop_ids
from engine.data.sft_dataset import ROLES, ChatTemplate, chat_template_of, render
from engine.data.tokenizer import Tokenizer
from engine.device import init_distributed, leave_distributed
from engine.inference.decoding import (
    add_decoding_flags,
    batch_size,
    completion,
    decode_batches,
    encode,
    sampling_params,
)
from engine.inference.generation import TokenCallback
from engine.inference.loading import load_model, load_tokenizer
from engine.models.families import add_model_provider_flag
from engine.progress import Progress


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (any layout)")
    parser.add_argument("--ckpt-step", type=int, default=None, help="iteration (default: latest)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument(
        "--prompts-file",
        default=None,
        help='a text file, one prompt per line (--chat: JSONL, {"messages": [...]} a line)',
    )
    parser.add_argument(
        "--chat", action="store_true", help="prompts are user messages, in the chat template"
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        help="with --chat: auto (default: the tokenizer's Jinja template), a .jinja file, or "
        "a built-in name (llama2, plain)",
    )
    add_decoding_flags(parser)
    parser.add_argument("--tokenizer-type", default=None, help="default: the checkpoint's run's")
    parser.add_argument("--tokenizer-model", default=None, help="default: the checkpoint's run's")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    add_model_provider_flag(parser)  # a checkpoint of a family of your own
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise SystemExit("give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def read_conversations(args: argparse.Namespace) -> list[list[dict]]:
    """The conversations of ``--chat``: each ``--prompt`` as one user message, then each
    line of ``--prompts-file`` (JSONL, ``{"messages": [...]}``)."""
    conversations = [[{"role": "user", "content": text}] for text in args.prompt]
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if line.strip():
                conversations.append(_messages(line, f"{args.prompts_file}:{number}"))
    if not conversations:
        raise SystemExit("give --prompt TEXT (repeatable) or --prompts-file FILE (JSONL)")
    return conversations


def _messages(line: str, where: str) -> list[dict]:
    try:
        messages = json.loads(line)["messages"]
        if messages and all(m["role"] in ROLES and isinstance(m["content"], str) for m in messages):
            return messages
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    raise SystemExit(
        f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} with roles '
        f"in {ROLES}"
    )


def chat_prompts(
    conversations: list[list[dict]],
    tokenizer: Tokenizer,
    template: ChatTemplate | JinjaChatTemplate,
) -> tuple[list[list[int]], list[str], list[int]]:
    """Prompt ids and texts of the conversations rendered for the assistant's reply, and the
    ids that end its turn (a built-in template's turn ends with EOS)."""
    if isinstance(template, ChatTemplate):
        prefix = tokenizer.tokenize(template.assistant_prefix) if template.assistant_prefix else []
        prompts = [render(m, tokenizer, template)[0].tolist() + prefix for m in conversations]
        return prompts, [tokenizer.detokenize(p) for p in prompts], [tokenizer.eod]
    encoded = [encode_prompt(template, m, tokenizer) for m in conversations]
    return [ids for ids, _ in encoded], [text for _, text in encoded], stop_ids(template, tokenizer)


class Printer:
    """Prints new text as tokens arrive (global rank 0 only).

    Text is decoded from the prompt plus all new tokens and only the part past what was
    already printed is written (`engine.inference.decoding.completion`). A single prompt
    streams token by token; several print each as it finishes. `batch` gives the streaming
    callback of the prompts ``[start, start + size)``, decoded as one batch.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompts: list[list[int]],
        texts: list[str],
        before_print: Callable[[], None] | None = None,
    ):
        self.tokenizer, self.prompts, self.texts = tokenizer, prompts, texts
        self.before_print = before_print  # e.g. blank a progress line on the same terminal
        self.new: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.printed = ""
        self.stream = len(prompts) == 1
        if self.stream:
            print(texts[0], end="", flush=True)

    def batch(self, start: int, size: int) -> TokenCallback:
        def on_tokens(tokens: torch.Tensor, finished: torch.Tensor) -> None:
            self.step(start, tokens, finished)

        return on_tokens

    def step(self, start: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        for offset, token in enumerate(tokens.tolist()):
            row = start + offset
            if not self.done[row]:
                self.new[row].append(token)
                self.done[row] = bool(finished[offset])
                if self.done[row] and not self.stream:
                    self.print_one(row)
        if self.stream:
            text = self.completion(0)
            if text.startswith(self.printed):
                print(text[len(self.printed) :], end="", flush=True)
                self.printed = text

    def completion(self, row: int) -> str:
        return completion(self.tokenizer, self.prompts[row], self.new[row])

    def print_one(self, row: int) -> None:
        if self.before_print is not None:
            self.before_print()
        print(f"--- prompt {row} ---\n{self.texts[row]}{self.completion(row)}", flush=True)

    def finish_batch(self, start: int, size: int) -> None:
        """Print the prompts of a batch that reached --max-new-tokens without stopping."""
        for row in range(start, start + size):
            if not self.done[row] and not self.stream:
                self.done[row] = True
                self.print_one(row)

    def finish(self) -> None:
        if self.stream:
            print(self.completion(0)[len(self.printed) :], flush=True)
            return
        self.finish_batch(0, len(self.prompts))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sampling_params(args)  # a bad flag fails before the model loads
    except ValueError as error:
        parser.error(str(error))
    conversations = read_conversations(args) if args.chat else None
    texts = read_prompts(args) if conversations is None else []
    init_distributed()
    parallel_state.initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    )
    try:
        tokenizer = load_tokenizer(
            args.load, args.ckpt_step, args.tokenizer_type, args.tokenizer_model
        )
        if tokenizer is None:
            raise SystemExit(f"{args.load} records no tokenizer: give --tokenizer-type/-model")
        stops = [tokenizer.eod]
        if conversations is None:
            prompts = [encode(tokenizer, text, not args.no_bos) for text in texts]
        else:
            try:  # the template before the model: a wrong flag fails at once
                template = chat_template_of(args.chat_template or AUTO, tokenizer.path)
            except ValueError as error:
                raise SystemExit(str(error)) from None
            prompts, texts, stops = chat_prompts(conversations, tokenizer, template)
            if dist.get_rank() == 0:
                name = template.origin if isinstance(template, JinjaChatTemplate) else template.name
                print(f"chat template {name}; stop ids {stops}", file=sys.stderr)
        model = load_model(args.load, args.ckpt_step)
        rank0 = dist.get_rank() == 0
        # Progress only for many prompts: one batch already shows itself as it streams.
        progress = Progress(len(prompts), "prompts", label="generate",
                            enabled=rank0 and len(prompts) > batch_size(args))  # fmt: skip
        printer = Printer(tokenizer, prompts, texts, progress.clear) if rank0 else None

        def batch_done(start: int, size: int) -> None:
            if printer is not None:
                printer.finish_batch(start, size)
            progress.update(advance=size)

        decode_batches(
            model,
            prompts,
            args,
            stops,
            pad_id=tokenizer.pad if tokenizer.pad is not None else tokenizer.eod,
            on_tokens=printer.batch if printer is not None else None,
            on_batch=batch_done,
        )
        progress.close()
        if printer is not None:
            printer.finish()
    finally:
        parallel_state.destroy_model_parallel()
        leave_distributed(together=sys.exc_info()[1] is None)  # no barrier if a rank failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
