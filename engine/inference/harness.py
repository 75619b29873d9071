"""The engine as an EleutherAI lm-evaluation-harness model, ``engine``, at any TP / PP / DP layout.

    torchrun --nproc-per-node 2 tools/lm_eval.py --model engine \
        --model_args checkpoint=ckpt/run,tensor_parallel=2 --tasks hellaswag --batch_size 8

Importing this module registers the ``engine`` model with ``lm_eval`` (an optional extra:
``pip install -e '.[eval]'``); ``tools/lm_eval.py`` imports it and then runs lm_eval's own
command line, since lm_eval 0.4 has no plugin entry point for outside models. From Python::

    import engine.inference.harness  # noqa: F401  (registers "engine")
    lm_eval.simple_evaluate(model="engine", model_args="checkpoint=ckpt/run", tasks=[...])

The model and its tokenizer come from the checkpoint (`engine.inference.loading`): the family
and shapes its metadata records, the tokenizer its training run or conversion recorded.

How the ranks share the work: lm_eval's ``rank`` / ``world_size`` are the data-parallel ones,
so lm_eval deals documents to the model replicas and gathers their metrics over the DP group.
Within a replica every TP and PP rank receives the same requests and runs each forward
collectively; the last stage computes the scores and broadcasts them back along the pipeline
(`engine.inference.generation.share_from_last_stage`), so every rank returns the same answers.

Scores follow lm_eval's ``hf`` model request for request, so the two agree on the same
weights: continuations are scored from full-vocabulary float32 log-softmax; contexts longer
than ``max_length`` lose tokens on the left; rolling log-likelihoods use lm_eval's disjoint
windows of ``max_length`` tokens; generation left-truncates the context to
``max_length - max_gen_toks``, decodes the new tokens alone and cuts at the stop strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from engine import parallel_state
from engine.data.tokenizer import Tokenizer
from engine.device import init_distributed
from engine.inference.generation import (
    SamplingParams,
    forward_logits,
    generate,
    share_from_last_stage,
)
from engine.inference.loading import load_model, load_tokenizer
from engine.models.chunk import config_of
from engine.progress import Progress

Scored = tuple[tuple[str | None, str], list[int], list[int]]
"""One log-likelihood request as lm_eval tokenises it: ``((context, continuation), context
ids, continuation ids)``."""


@register_model("engine")
class EngineLM(TemplateLM):
    """An engine checkpoint behind lm_eval's model interface (collective over every rank).

    Args (lm_eval's ``--model_args``):
        checkpoint: the checkpoint directory (any saved layout).
        iteration: the checkpoint's iteration (default: the latest).
        tensor_parallel, pipeline_parallel: the layout to run at; the process group and the
            parallel state are started here unless the caller already started them (they must
            then match).
        batch_size: requests per forward (lm_eval's ``--batch_size``).
        max_length: the longest input in tokens (default: the model's
            ``max_position_embeddings``).
        max_gen_toks: new tokens per generation request unless the task sets it.
        add_bos_token: True prepends BOS to every encoding, False strips it, None (default)
            keeps what the tokenizer produces (lm_eval's ``hf`` model's argument).
        tokenizer_type, tokenizer_model: override the tokenizer the checkpoint records.
        seed: the sampling seed of generation requests that sample.
    """

    def __init__(
        self,
        checkpoint: str,
        iteration: int | None = None,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        tokenizer_type: str | None = None,
        tokenizer_model: str | None = None,
        seed: int = 1234,
        **lm_eval_options: Any,  # lm_eval's device / max_batch_size: the engine picks its own
    ) -> None:
        super().__init__()
        self.batch_size = _batch_size(batch_size)
        self._device = init_distributed()
        _use_layout(int(tensor_parallel), int(pipeline_parallel))
        tokenizer = load_tokenizer(checkpoint, iteration, tokenizer_type, tokenizer_model)
        if tokenizer is None:
            raise ValueError(
                f"checkpoint={checkpoint} records no tokenizer: give tokenizer_type= and "
                "tokenizer_model= in --model_args"
            )
        self.text_tokenizer: Tokenizer = tokenizer
        self.model = load_model(checkpoint, iteration)
        positions = config_of(self.model).max_position_embeddings
        self.max_length = int(max_length or positions)
        if not 0 < self.max_length <= positions:
            raise ValueError(
                f"max_length={self.max_length} must be in 1..{positions} (the model's "
                "max_position_embeddings)"
            )
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed = int(seed)
        self._rank = parallel_state.get_data_parallel_rank()
        self._world_size = parallel_state.get_data_parallel_world_size()

    # Tokens -------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, else the end-of-document id."""
        bos = self.text_tokenizer.bos
        return bos if bos is not None else self.text_tokenizer.eod

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        ids = self.text_tokenizer.tokenize(string)
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.text_tokenizer.bos
        if add_bos is not None and bos is not None:
            starts = ids[:1] == [bos]
            if add_bos and not starts:
                ids = [bos] + ids
            elif not add_bos and starts:
                ids = ids[1:]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Iterable[int]) -> str:
        return self.text_tokenizer.detokenize(list(ids))

    @property
    def tokenizer_name(self) -> str:
        return str(self.text_tokenizer.path or type(self.text_tokenizer).__name__)

    # Requests -----------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[Scored], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """``(sum of the continuation's log-probabilities, whether greedy decoding gives the
        continuation)`` of each request, longest first in batches (lm_eval's `Collator`)."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        with self._progress(len(requests), "loglikelihood") as progress:
            for batch in order.get_batched(n=self.batch_size):
                scores = self._score_batch([(r[1], r[2]) for r in batch])
                for request, score in zip(batch, scores, strict=True):
                    results.append(score)
                    self.cache_hook.add_partial("loglikelihood", request[0], score)
                progress.update(advance=len(batch))
        return order.get_original(results)

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One forward over right-padded inputs ``[b, s]``: causal attention never lets a
        real token see the padding after it, so no mask is needed."""
        inputs = [
            (context + continuation)[-(self.max_length + 1) :][:-1]
            for context, continuation in pairs
        ]
        length = max(len(ids) for ids in inputs)
        tokens = torch.full((len(inputs), length), self.eot_token_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            tokens[row, : len(ids)] = torch.tensor(ids)
        tokens = tokens.to(self._device)
        positions = torch.arange(length, device=self._device).expand(len(inputs), length)
        logits = forward_logits(self.model, tokens, positions)  # [b, s, V] on the last stage
        # Per row: the continuation's log-probability (float64) and 1.0 if greedy.
        scores = torch.zeros(len(inputs), 2, dtype=torch.float64, device=self._device)
        if logits is not None:
            log_probs = torch.log_softmax(logits, dim=-1)
            for row, (ids, (_, continuation)) in enumerate(zip(inputs, pairs, strict=True)):
                n = len(continuation)
                predicted = log_probs[row, len(ids) - n : len(ids)]  # [n, V]
                target = torch.tensor(continuation, device=self._device)
                scores[row, 0] = predicted.gather(1, target[:, None]).double().sum()
                scores[row, 1] = float(bool((predicted.argmax(dim=-1) == target).all()))
        share_from_last_stage(scores)
        return [(float(logp), bool(greedy)) for logp, greedy in scores.tolist()]

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-likelihood of whole texts, over lm_eval's disjoint windows of ``max_length``
        tokens (each token scored once, after the prefix token)."""
        windows: list[Scored] = []
        counts = []
        for (text,) in (request.args for request in requests):
            pieces = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            windows += [((None, text), context, target) for context, target in pieces]
            counts.append(len(pieces))
        scores = self._loglikelihood_tokens(windows)
        results, begin = [], 0
        for request, count in zip(requests, counts, strict=True):
            total = sum(logp for logp, _ in scores[begin : begin + count])
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            begin += count
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, batched by equal generation settings, longest first;
        each stops at EOS or ``max_gen_toks`` and is cut at the first stop string."""
        order = Collator(
            [request.args for request in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos = self.tok_decode([self.eot_token_id]) or None
        results = []
        progress = self._progress(len(requests), "generate_until")
        for batch in order.get_batched(n=self.batch_size):
            contexts = [context for context, _ in batch]
            options = normalize_gen_kwargs(batch[0][1], self.max_gen_toks)
            until = handle_stop_sequences(options.pop("until", None), eos=eos)
            max_new = int(options.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(
                    f"max_gen_toks ({max_new}) must be below max_length ({self.max_length})"
                )
            prompts = [
                self.tok_encode(c, left_truncate_len=self.max_length - max_new) for c in contexts
            ]
            sampling = SamplingParams(
                float(options.get("temperature") or 0.0),
                int(options.get("top_k") or 0),
                float(options.get("top_p") or 1.0),
                self.seed,
            )
            outputs = generate(self.model, prompts, max_new, sampling, eos_id=self.eot_token_id,
                               pad_id=self.eot_token_id)  # fmt: skip
            for (context, gen_kwargs), ids in zip(batch, outputs, strict=True):
                if ids[-1:] == [self.eot_token_id]:
                    ids = ids[:-1]
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            progress.update(advance=len(batch))
        progress.close()
        return order.get_original(results)

    def _progress(self, total: int, label: str) -> Progress:
        """Requests done, with rate and ETA, on global rank 0 (`engine.progress`)."""
        return Progress(total, "requests", label=label, enabled=dist.get_rank() == 0)

    # Data-parallel communication (lm_eval's evaluator calls these when world_size > 1) -----

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` of every DP rank, concatenated (0-d tensors stacked)."""
        group = parallel_state.get_data_parallel_group()
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor, group=group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every DP rank's ``obj`` on DP rank ``dst``; None elsewhere."""
        gathered: list[Any] | None = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, gathered, group=parallel_state.get_data_parallel_group(),
                           group_dst=dst)  # fmt: skip
        return gathered

    def barrier(self) -> None:
        dist.barrier(group=parallel_state.get_data_parallel_group())


def _batch_size(value: int | str) -> int:
    """lm_eval's ``--batch_size`` as an int (its ``auto`` search probes CUDA memory only)."""
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"--batch_size {value!r}: the engine model takes a positive integer")
    return size


def _use_layout(tensor_parallel: int, pipeline_parallel: int) -> None:
    """Start the parallel state at this layout, or check the one the caller started."""
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
        return
    running = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if running != (tensor_parallel, pipeline_parallel):
        raise ValueError(
            f"tensor_parallel={tensor_parallel}, pipeline_parallel={pipeline_parallel} in "
            f"--model_args, but the parallel state already runs TP={running[0]}, PP={running[1]}"
        )
