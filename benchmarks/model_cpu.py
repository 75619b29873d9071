"""Forward+backward tokens/s of our LlamaModel against transformers' LlamaForCausalLM.

Same config, same weights (copied through the canonical view), same tokens, one process,
measured side by side in alternation so both see the same machine state. The last line is
``ratio_vs_hf=X.XX`` (ours / theirs; above 1 means we are faster).

    python benchmarks/model_cpu.py [--layers 4 --hidden 256 --seq 256 --batch 4 --repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from engine import parallel_state
from engine.device import init_distributed
from engine.models import LlamaModel, ModelConfig
from engine.models.llama.hf import canonical_from_hf, hf_config_kwargs
from engine.models.weights import load_full_state


def _step_seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    init_distributed()
    parallel_state.initialize_model_parallel()
    config = ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=int(args.hidden * 8 / 3 // 64 * 64),
        vocab_size=args.vocab, max_position_embeddings=args.seq,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_kwargs(config)))
    ours = LlamaModel(config)
    load_full_state(ours, canonical_from_hf(hf.state_dict(), config))
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def our_step() -> None:
        ours(inputs, labels=labels).mean().backward()
        ours.zero_grad(set_to_none=True)

    def hf_step() -> None:
        # HF shifts labels itself: pass the unshifted sequence.
        hf(tokens, labels=tokens).loss.backward()
        hf.zero_grad(set_to_none=True)

    for step in (our_step, hf_step):  # warm-up
        step()
    our_times, hf_times = [], []
    for _ in range(args.repeats):
        our_times.append(_step_seconds(our_step))
        hf_times.append(_step_seconds(hf_step))
    tokens_per_step = args.batch * args.seq
    ours_tps = tokens_per_step / statistics.median(our_times)
    hf_tps = tokens_per_step / statistics.median(hf_times)
    print(
        f"config: {args.layers} layers, h={args.hidden}, heads={args.heads}/{args.kv_heads}, "
        f"vocab={args.vocab}, batch={args.batch} x seq={args.seq}, "
        f"threads={torch.get_num_threads()}"
    )
    print(f"engine       {ours_tps:10.0f} tokens/s (median of {args.repeats})")
    print(f"transformers {hf_tps:10.0f} tokens/s (median of {args.repeats})")
    print(f"ratio_vs_hf={ours_tps / hf_tps:.2f}")


if __name__ == "__main__":
    main()
