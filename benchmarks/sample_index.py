"""Sample-index build time: ours (`engine.data.helpers`) against Megatron-Core's C++ helper.

    python benchmarks/sample_index.py [--tokens 1e9] [--doc-tokens 512] [--seq-length 4096]

The corpus is `--tokens` tokens in documents of about `--doc-tokens` tokens each (2 KB of
English text is about 512 LLaMA-2 tokens), lengths drawn uniformly in [1, 2 * doc-tokens),
in one shuffled epoch, cut into samples of `--seq-length` + 1 tokens. Both builders get the
same arrays; their outputs are checked equal. Best of `--trials`, alternating the two. The
last line is `ratio_to_megatron=X.XX` (Megatron-Core's time / ours: above 1 is faster).
Needs `megatron-core` (the [test] extra).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data import helpers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--doc-tokens", type=int, default=512)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    try:
        from megatron.core.datasets import helpers as megatron_helpers
    except ImportError as error:
        raise SystemExit(f"needs megatron-core (pip install -e '.[test]'): {error}") from error

    rng = np.random.default_rng(0)
    num_docs = int(args.tokens // args.doc_tokens)
    sizes = rng.integers(1, 2 * args.doc_tokens, num_docs).astype(np.int32)
    document_index = rng.permutation(num_docs).astype(np.int32)
    tokens = int(sizes.sum(dtype=np.int64))
    call = (sizes, document_index, args.seq_length, 1, tokens, True, True)

    def ours():
        return helpers.build_sample_idx(*call)

    def megatron():
        return megatron_helpers.build_sample_idx(*call)

    np.testing.assert_array_equal(ours(), megatron())
    best = {"ours": float("inf"), "megatron": float("inf")}
    for _ in range(args.trials):
        for name, fn in (("ours", ours), ("megatron", megatron)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    samples = (tokens - 1) // args.seq_length
    print(f"{tokens:,} tokens, {num_docs:,} documents, {samples:,} samples of {args.seq_length}")
    print(f"engine.data.helpers.build_sample_idx: {best['ours'] * 1e3:.2f} ms")
    print(f"megatron.core.datasets.helpers.build_sample_idx: {best['megatron'] * 1e3:.2f} ms")
    print(f"ratio_to_megatron={best['megatron'] / best['ours']:.2f}")


if __name__ == "__main__":
    main()
