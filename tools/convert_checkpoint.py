"""Convert checkpoints between HuggingFace and the engine, between layouts, and LoRA adapters out.

    python tools/convert_checkpoint.py hf-to-engine --load-dir hf/Llama-2-7b-hf \
        --save-dir ckpt/llama2-7b --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2
    python tools/convert_checkpoint.py engine-to-hf --load-dir ckpt/run --save-dir hf/out \
        --tokenizer-dir hf/Llama-2-7b-hf
    python tools/convert_checkpoint.py reshard --load-dir ckpt/run --save-dir ckpt/tp4 \
        --target-tensor-parallel-size 4 --target-pipeline-parallel-size 1
    # a LoRA run's adapters (any layout): folded into their base, or as a PEFT adapter
    python tools/convert_checkpoint.py lora-merge --load-dir ckpt/lora --save-dir ckpt/merged
    python tools/convert_checkpoint.py lora-to-peft --load-dir ckpt/lora --save-dir peft/out \
        --base-model-name-or-path meta-llama/Llama-2-7b-hf

One process, no GPU, memory bounded by a few copies of the largest tensor (see
docs/conversion.md). The logic is `engine.conversion.convert`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from engine.checkpointing.storage import CheckpointError
from engine.conversion.convert import ConversionError, engine_to_hf, hf_to_engine, reshard
from engine.conversion.lora import lora_to_peft, merge_lora_checkpoint
from engine.models.families import add_model_provider_flag
from engine.progress import Progress


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in (
        ("hf-to-engine", "HF model directory -> engine checkpoint at the target layout"),
        ("engine-to-hf", "engine checkpoint (any layout) -> HF model directory"),
        ("reshard", "engine checkpoint -> engine checkpoint at the target layout"),
        ("lora-merge", "LoRA adapters checkpoint -> its base with the adapters merged (TP=1)"),
        ("lora-to-peft", "LoRA adapters checkpoint -> PEFT adapter directory"),
    ):
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--load-dir", required=True, help="the source directory")
        sub.add_argument("--save-dir", required=True, help="where to write the result")
        add_model_provider_flag(sub)  # a family of your own (its inventory and HF adapter)
        sub.add_argument(
            "--dtype", choices=["float32", "bfloat16", "float16"], default=None,
            help="dtype of the written weights (default: as stored in the source)",
        )  # fmt: skip
        if name != "hf-to-engine":
            sub.add_argument(
                "--ckpt-step", type=int, default=None,
                help="iteration to read (default: the latest)",
            )  # fmt: skip
        if name == "lora-merge":
            sub.add_argument(
                "--pretrained-checkpoint", default=None,
                help="the base (default: the one the adapters' checkpoint records)",
            )  # fmt: skip
        if name == "lora-to-peft":
            sub.add_argument(
                "--base-model-name-or-path", default=None,
                help="recorded in adapter_config.json (the HF base PEFT loads it onto)",
            )  # fmt: skip
        if name in ("hf-to-engine", "reshard"):
            sub.add_argument("--target-tensor-parallel-size", type=int, default=1)
            sub.add_argument("--target-pipeline-parallel-size", type=int, default=1)
        if name == "hf-to-engine":
            sub.add_argument(
                "--checkpoint-type", choices=["hf", "meta"], default="hf",
                help="hf: a transformers directory; meta: params.json + consolidated.*.pth",
            )  # fmt: skip
            sub.add_argument(
                "--make-vocab-size-divisible-by", type=int, default=128,
                help="vocabulary padding per TP rank of the engine model",
            )  # fmt: skip
        if name == "engine-to-hf":
            sub.add_argument(
                "--tokenizer-dir", default=None,
                help="copy this directory's tokenizer files (or this .model file) alongside",
            )  # fmt: skip
            sub.add_argument(
                "--max-shard-size-gb", type=float, default=5.0,
                help="largest safetensors shard, in GiB (HF's default: 5)",
            )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    # hf-to-engine, reshard and engine-to-hf count the tensors converted, the LoRA commands
    # their steps (they set their own unit).
    lora = args.command in ("lora-merge", "lora-to-peft")
    progress = Progress(unit="steps" if lora else "tensors", label=args.command)
    try:
        dtype = None if args.dtype is None else getattr(torch, args.dtype)
        if args.command == "hf-to-engine":
            out = hf_to_engine(
                args.load_dir, args.save_dir, args.target_tensor_parallel_size,
                args.target_pipeline_parallel_size, dtype, args.make_vocab_size_divisible_by,
                args.checkpoint_type, progress,
            )  # fmt: skip
        elif args.command == "lora-merge":
            out = merge_lora_checkpoint(
                args.load_dir,
                args.save_dir,
                args.pretrained_checkpoint,
                args.ckpt_step,
                dtype,
                progress,
            )
        elif args.command == "lora-to-peft":
            out = lora_to_peft(
                args.load_dir,
                args.save_dir,
                args.base_model_name_or_path,
                args.ckpt_step,
                progress,
            )
        elif args.command == "reshard":
            out = reshard(
                args.load_dir, args.save_dir, args.target_tensor_parallel_size,
                args.target_pipeline_parallel_size, args.ckpt_step, dtype, progress,
            )  # fmt: skip
        else:
            out = engine_to_hf(
                args.load_dir, args.save_dir, args.ckpt_step, dtype,
                int(args.max_shard_size_gb * 2**30), args.tokenizer_dir, progress,
            )  # fmt: skip
    except (ConversionError, CheckpointError) as error:
        progress.clear()
        print(f"error: {error}", file=sys.stderr)
        return 1
    if progress.total is not None:  # a command that counted
        progress.close()
    print(f"{args.command}: wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
