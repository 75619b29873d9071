"""EleutherAI's lm-evaluation-harness on an engine checkpoint: lm_eval's own command line with
the engine registered as ``--model engine`` (`engine.inference.harness`).

    torchrun --nproc-per-node 2 tools/lm_eval_harness.py --model engine \
        --model_args checkpoint=ckpt/run,tensor_parallel=2 --tasks hellaswag,wikitext \
        --batch_size 8 --output_path results/

Every argument is lm_eval's (``lm_eval --help``); ``--model_args`` takes the engine model's
``checkpoint``, ``iteration``, ``tensor_parallel``, ``pipeline_parallel``, ``max_length``,
``max_gen_toks``, ``add_bos_token``, ``tokenizer_type``, ``tokenizer_model`` and ``seed``.
The world is split into TP x PP model replicas; lm_eval deals the documents to the replicas.
Needs the ``eval`` extra: ``pip install -e '.[eval]'``. See docs/evaluation.md.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        import engine.inference.harness  # noqa: F401  (registers --model engine)
    except ImportError as error:
        if (error.name or "").split(".")[0] != "lm_eval":
            raise
        print(
            f"tools/lm_eval_harness.py needs lm-evaluation-harness ({error}): "
            "pip install -e '.[eval]'",
            file=sys.stderr,
        )
        return 2
    from engine import parallel_state
    from engine.device import leave_distributed

    try:
        cli_evaluate()
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        leave_distributed(together=sys.exc_info()[1] is None)  # no barrier if a rank failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
