"""Command-line flags with Megatron-LM's names -> one `JobConfig`.

Three sources, later ones winning: the dataclass defaults (or ``--model-preset``'s
architecture), a ``--config file.yaml`` whose keys are flag names (``num-layers`` or
``num_layers``), and the command line::

    job = parse_args(["--num-layers", "32", "--hidden-size", "4096",
                      "--num-attention-heads", "32", "--vocab-size", "32000",
                      "--tensor-model-parallel-size", "8",
                      "--micro-batch-size", "1", "--global-batch-size", "1024",
                      "--seq-length", "4096", "--bf16", "--train-iters", "1000"])
    job.validate(world_size=32)
    job.num_microbatches(32)  # gradient accumulation: 1024 / (1 x 4) = 256

Every flag writes one field of one section of `JobConfig` (``--ddp-bucket-size`` ->
``job.ddp.bucket_size``); the few flags that do more (``--bf16`` also sets the parameters'
dtype, ``--num-layers-per-virtual-pipeline-stage`` becomes the virtual pipeline size) are
handled in `_build_job`. Help texts are the fields' own docstrings, so they cannot drift.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
from typing import Any, NoReturn

import torch
import yaml

from engine.checkpointing.config import CheckpointConfig
from engine.data.config import DataConfig
from engine.data.tokenizer import build_tokenizer
from engine.distributed.config import DistributedDataParallelConfig
from engine.models.backends import BACKEND_CHOICES
from engine.models.config import (
    CP_COMM_TYPES,
    PRESETS,
    RECOMPUTE_GRANULARITIES,
    ModelConfig,
    flag_rope_scaling,
)
from engine.models.families import MODEL_PROVIDER_HELP, ModelFamily, load_model_provider
from engine.optimizer.config import OptimizerConfig
from engine.parallel_state import ParallelConfig
from engine.peft.config import LoraConfig
from engine.training.config import JobConfig, TrainingConfig

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "ddp": DistributedDataParallelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
}

# (flag, section, field, argparse keywords). A ``bool`` type means a store_true switch;
# with ``negatable`` (a switch on by default) also its ``--no-`` form.
_FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    # Architecture: given explicitly, they override --model-preset.
    ("--num-layers", "model", "num_layers", {"type": int}),
    ("--hidden-size", "model", "hidden_size", {"type": int}),
    ("--ffn-hidden-size", "model", "ffn_hidden_size", {"type": int}),
    ("--num-attention-heads", "model", "num_attention_heads", {"type": int}),
    ("--num-query-groups", "model", "num_query_groups", {"type": int}),
    ("--max-position-embeddings", "model", "max_position_embeddings", {"type": int}),
    ("--vocab-size", "model", "vocab_size", {"type": int}),
    ("--make-vocab-size-divisible-by", "model", "make_vocab_size_divisible_by", {"type": int}),
    ("--rotary-base", "model", "rotary_base", {"type": float}),
    ("--kv-channels", "model", "kv_channels", {"type": int}),
    ("--add-qkv-bias", "model", "qkv_bias", {"type": bool}),
    ("--qk-layernorm", "model", "qk_layernorm", {"type": bool}),
    ("--norm-epsilon", "model", "norm_epsilon", {"type": float}),
    ("--init-method-std", "model", "init_method_std", {"type": float}),
    ("--attention-dropout", "model", "attention_dropout", {"type": float}),
    # How the layers run.
    ("--decoder-first-pipeline-num-layers", "model", "decoder_first_pipeline_num_layers",
     {"type": int}),
    ("--decoder-last-pipeline-num-layers", "model", "decoder_last_pipeline_num_layers",
     {"type": int}),
    ("--sequence-parallel", "model", "sequence_parallel", {"type": bool}),
    ("--recompute-granularity", "model", "recompute_granularity",
     {"choices": RECOMPUTE_GRANULARITIES}),
    ("--attention-backend", "model", "attention_backend", {"choices": BACKEND_CHOICES}),
    ("--norm-backend", "model", "norm_backend", {"choices": BACKEND_CHOICES}),
    ("--tensor-model-parallel-size", "parallel", "tensor_model_parallel_size", {"type": int}),
    ("--pipeline-model-parallel-size", "parallel", "pipeline_model_parallel_size",
     {"type": int}),
    ("--context-parallel-size", "parallel", "context_parallel_size", {"type": int}),
    ("--cp-comm-type", "model", "cp_comm_type", {"choices": CP_COMM_TYPES}),
    ("--cross-entropy-chunk-size", "model", "cross_entropy_chunk_size", {"type": int}),
    # Optimizer, precision, schedule.
    ("--lr", "optimizer", "lr", {"type": float}),
    ("--min-lr", "optimizer", "min_lr", {"type": float}),
    ("--weight-decay", "optimizer", "weight_decay", {"type": float}),
    ("--start-weight-decay", "optimizer", "start_weight_decay", {"type": float}),
    ("--end-weight-decay", "optimizer", "end_weight_decay", {"type": float}),
    ("--weight-decay-incr-style", "optimizer", "weight_decay_incr_style", {}),
    ("--adam-beta1", "optimizer", "adam_beta1", {"type": float}),
    ("--adam-beta2", "optimizer", "adam_beta2", {"type": float}),
    ("--adam-eps", "optimizer", "adam_eps", {"type": float}),
    ("--clip-grad", "optimizer", "clip_grad", {"type": float}),
    ("--bf16", "optimizer", "bf16", {"type": bool}),
    ("--fp16", "optimizer", "fp16", {"type": bool}),
    ("--loss-scale", "optimizer", "loss_scale", {"type": float}),
    ("--initial-loss-scale", "optimizer", "initial_loss_scale", {"type": float}),
    ("--min-loss-scale", "optimizer", "min_loss_scale", {"type": float}),
    ("--loss-scale-window", "optimizer", "loss_scale_window", {"type": int}),
    ("--hysteresis", "optimizer", "hysteresis", {"type": int}),
    ("--lr-decay-style", "optimizer", "lr_decay_style", {}),
    ("--lr-warmup-iters", "optimizer", "lr_warmup_iters", {"type": int}),
    ("--lr-warmup-samples", "optimizer", "lr_warmup_samples", {"type": int}),
    ("--lr-warmup-fraction", "optimizer", "lr_warmup_fraction", {"type": float}),
    ("--lr-decay-iters", "optimizer", "lr_decay_iters", {"type": int}),
    ("--lr-decay-samples", "optimizer", "lr_decay_samples", {"type": int}),
    ("--lr-wsd-decay-style", "optimizer", "lr_wsd_decay_style", {}),
    ("--lr-wsd-decay-iters", "optimizer", "lr_wsd_decay_iters", {"type": int}),
    ("--lr-wsd-decay-samples", "optimizer", "lr_wsd_decay_samples", {"type": int}),
    ("--use-distributed-optimizer", "ddp", "use_distributed_optimizer", {"type": bool}),
    ("--use-torch-fsdp2", "ddp", "use_torch_fsdp2", {"type": bool}),
    ("--fsdp-reduce-every-microbatch", "ddp", "fsdp_reduce_every_microbatch", {"type": bool}),
    ("--overlap-grad-reduce", "ddp", "overlap_grad_reduce", {"type": bool}),
    ("--overlap-param-gather", "ddp", "overlap_param_gather", {"type": bool}),
    ("--ddp-bucket-size", "ddp", "bucket_size", {"type": int}),
    ("--accumulate-allreduce-grads-in-fp32", "ddp", "grad_reduce_in_fp32", {"type": bool}),
    # Training loop.
    ("--micro-batch-size", "training", "micro_batch_size", {"type": int}),
    ("--global-batch-size", "training", "global_batch_size", {"type": int}),
    ("--seq-length", "training", "seq_length", {"type": int}),
    ("--train-iters", "training", "train_iters", {"type": int}),
    ("--train-samples", "training", "train_samples", {"type": int}),
    ("--eval-interval", "training", "eval_interval", {"type": int}),
    ("--eval-iters", "training", "eval_iters", {"type": int}),
    ("--log-interval", "training", "log_interval", {"type": int}),
    ("--exit-interval", "training", "exit_interval", {"type": int}),
    ("--exit-duration-in-mins", "training", "exit_duration_in_mins", {"type": float}),
    ("--exit-on-nan", "training", "exit_on_nan", {"type": bool}),
    ("--check-for-nan-in-loss-and-grad", "training", "check_for_nan_in_loss_and_grad",
     {"type": bool, "negatable": True}),
    ("--max-consecutive-skipped-steps", "training", "max_consecutive_skipped_steps",
     {"type": int}),
    ("--distributed-timeout-minutes", "training", "distributed_timeout_minutes",
     {"type": float}),
    ("--seed", "training", "seed", {"type": int}),
    ("--compile", "training", "compile", {"type": bool}),
    ("--compile-loss-head", "training", "compile_loss_head", {"type": bool}),
    ("--peak-tflops", "training", "peak_tflops", {"type": float}),
    ("--tensorboard-dir", "training", "tensorboard_dir", {}),
    ("--wandb-project", "training", "wandb_project", {}),
    ("--wandb-exp-name", "training", "wandb_exp_name", {}),
    ("--wandb-save-dir", "training", "wandb_save_dir", {}),
    ("--device-memory-gb", "training", "device_memory_gb", {"type": float}),
    ("--dry-run", "training", "dry_run", {"type": bool}),
    # Data.
    ("--data-path", "data", "data_path", {"nargs": "+"}),
    ("--split", "data", "split", {}),
    ("--data-cache-path", "data", "data_cache_path", {}),
    ("--tokenizer-type", "data", "tokenizer_type", {}),
    ("--tokenizer-model", "data", "tokenizer_model", {}),
    ("--reset-position-ids", "data", "reset_position_ids", {"type": bool}),
    ("--reset-attention-mask", "data", "reset_attention_mask", {"type": bool}),
    ("--eod-mask-loss", "data", "eod_mask_loss", {"type": bool}),
    ("--sft", "data", "sft", {"type": bool}),
    ("--chat-template", "data", "chat_template", {}),
    ("--num-workers", "data", "num_workers", {"type": int}),
    # Checkpoints.
    ("--save", "checkpoint", "save", {}),
    ("--load", "checkpoint", "load", {}),
    ("--pretrained-checkpoint", "checkpoint", "pretrained_checkpoint", {}),
    ("--load-peft-adapter", "checkpoint", "load_peft_adapter", {}),
    ("--save-interval", "checkpoint", "save_interval", {"type": int}),
    ("--keep-last-n", "checkpoint", "keep_last_n", {"type": int}),
    ("--finetune", "checkpoint", "finetune", {"type": bool}),
    ("--no-load-optim", "checkpoint", "no_load_optim", {"type": bool}),
    ("--no-load-rng", "checkpoint", "no_load_rng", {"type": bool}),
    ("--no-save-optim", "checkpoint", "no_save_optim", {"type": bool}),
    ("--no-save-rng", "checkpoint", "no_save_rng", {"type": bool}),
    ("--async-save", "checkpoint", "async_save", {"type": bool}),
]  # fmt: skip

_FLAG_ROPE = flag_rope_scaling()
"""What ``--use-rope-scaling`` builds (its help is written from it)."""

# Flags that are not one field: they are turned into fields by `_build_job`.
_SPECIAL_FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("--model-preset", {"choices": sorted(PRESETS)},
     "A named architecture (ModelConfig.PRESETS); explicit architecture flags override it."),
    ("--group-query-attention", {"type": bool},
     "Grouped-query attention (Megatron's switch); --num-query-groups gives the K/V heads "
     "(Megatron's default 1 when absent)."),
    ("--untie-embeddings-and-output-weights", {"type": bool},
     "Separate input embedding and output head. Without a preset Megatron's default applies "
     "(tied unless this is given); the built-in presets are already untied."),
    ("--num-layers-per-virtual-pipeline-stage", {"type": int},
     "Layers per virtual pipeline chunk; sets the virtual pipeline size (interleaved 1F1B)."),
    ("--num-virtual-stages-per-pipeline-rank", {"type": int},
     "Virtual pipeline chunks per pipeline rank (the same setting counted directly)."),
    ("--model-provider", {}, MODEL_PROVIDER_HELP),
    ("--use-rope-scaling", {"type": bool},
     f"Rope scaling of rope_type {_FLAG_ROPE.rope_type!r} (original context "
     f"{_FLAG_ROPE.original_max_position_embeddings}, low / high frequency factors "
     f"{_FLAG_ROPE.low_freq_factor:g} and {_FLAG_ROPE.high_freq_factor:g}), by "
     "--rope-scaling-factor."),
    ("--lora-rank", {"type": int},
     "Train LoRA adapters of this rank on a frozen base (engine.peft); without it every "
     "parameter trains."),
    ("--lora-alpha", {"type": float}, "LoRA's alpha: the update is scaled by alpha / rank "
     "(default 16)."),
    ("--lora-dropout", {"type": float}, "Dropout on the adapters' input (default 0)."),
    ("--lora-target-modules", {},
     "Comma-separated projections with adapters: qkv, out, gate_up, down (every block), or "
     "HF's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (default: all)."),
    ("--rope-scaling-factor", {"type": float},
     "The factor of --use-rope-scaling (default 8; the 3.2 models use 32)."),
]  # fmt: skip

_SECTION_OF = {f"{section}.{field}": section for _, section, field, _ in _FLAGS}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors say which source (a YAML file) they come from."""

    source: str | None = None

    def error(self, message: str) -> NoReturn:
        super().error(f"{self.source}: {message}" if self.source else message)


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string under each field), by field name."""
    tree = ast.parse(inspect.getsource(cls))
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef), cls
    body = class_def.body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _add(group: argparse._ArgumentGroup, flag: str, dest: str, kwargs: dict, help: str) -> None:
    """One flag whose value stays unset unless given, so later sources can tell."""
    kwargs = dict(kwargs)
    value_type = kwargs.pop("type", None)
    if value_type is bool:
        # A switch that is on by default also gets Megatron's --no-... form.
        negatable = kwargs.pop("negatable", False)
        kwargs["action"] = argparse.BooleanOptionalAction if negatable else "store_true"
    else:
        if value_type is not None:
            kwargs["type"] = value_type
        if "choices" not in kwargs:
            kwargs["metavar"] = dest.rsplit(".", 1)[-1].upper()
    group.add_argument(
        flag, dest=dest, default=argparse.SUPPRESS, help=help.replace("%", "%%"), **kwargs
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every flag (each defaults to "not given")."""
    parser = _Parser(
        description="Train a model with tensor, pipeline and data parallelism.",
        allow_abbrev=False,  # an abbreviation in a YAML key or script would hide a typo
    )
    parser.add_argument(
        "--config", default=None, metavar="FILE.yaml",
        help="YAML file of flag: value pairs; flags on the command line override it.",
    )  # fmt: skip
    special = parser.add_argument_group("derived")
    for flag, kwargs, help_text in _SPECIAL_FLAGS:
        _add(special, flag, flag[2:].replace("-", "_"), kwargs, help_text)
    groups = {name: parser.add_argument_group(name) for name in SECTIONS}
    for flag, section, field, kwargs in _FLAGS:
        doc = _field_docs(SECTIONS[section]).get(field, "")
        _add(groups[section], flag, f"{section}.{field}", kwargs, doc)
    return parser


def _yaml_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The YAML file as command-line tokens, so that it is typed and checked like the CLI.

    Errors go through ``parser.error``, whose source names the file.
    """
    try:
        with open(path) as file:
            loaded = yaml.safe_load(file)
    except OSError as error:
        parser.error(str(error.strerror))
    except yaml.YAMLError as error:
        parser.error(f"not valid YAML: {error}")
    if loaded is None:
        return []
    if not isinstance(loaded, dict):
        parser.error("expected a mapping of flag names to values")
    actions = {option: action for action in parser._actions for option in action.option_strings}
    argv: list[str] = []
    for key, value in loaded.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or flag in ("--config", "--help"):
            parser.error(f"unknown key {key!r} (there is no flag {flag})")
        if value is None:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(value, bool):
                parser.error(f"{key!r} is a switch, expected true or false, "
                             f"got {value!r}")  # fmt: skip
            if isinstance(action, argparse.BooleanOptionalAction):
                argv += [flag if value else "--no-" + flag[2:]]
            else:
                argv += [flag] if value else []
        elif action.nargs == "+" and isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, (list, dict)):
            parser.error(f"{key!r} takes one value, got {value!r}")
        elif action.nargs == "+":
            argv += [flag, *str(value).split()]  # "0.7 a 0.3 b" as on the command line
        else:
            argv += [flag, str(value)]
    return argv


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> JobConfig:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a `JobConfig`.

    With ``world_size``, also runs `JobConfig.validate` (without the run-length check under
    ``--dry-run``), reporting problems as usage errors.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    given: dict[str, Any] = {}
    if args.config is not None:
        parser.source = f"--config {args.config}"  # type: ignore[attr-defined]
        given.update(vars(parser.parse_args(_yaml_argv(parser, args.config))))
        parser.source = None  # type: ignore[attr-defined]
    given.update(vars(args))
    given.pop("config", None)
    try:
        job = _build_job(given)
        if world_size is not None:
            # A dry run only plans the layout: it needs no run length.
            job.validate(world_size, require_train_length=not job.training.dry_run)
    except ValueError as error:
        parser.error(str(error))
    return job


def _build_job(given: dict[str, Any]) -> JobConfig:
    """Fields from the flags given, over the defaults (and the preset's architecture)."""
    fields: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for dest, value in given.items():
        if dest in _SECTION_OF:
            fields[_SECTION_OF[dest]][dest.split(".", 1)[1]] = value
    model_fields, training = fields["model"], fields["training"]

    # Mixed precision: the model's parameters live in the 16-bit type, as Megatron's
    # params_dtype; the optimizer keeps float32 main copies.
    if fields["optimizer"].get("bf16"):
        model_fields["params_dtype"] = torch.bfloat16
    elif fields["optimizer"].get("fp16"):
        model_fields["params_dtype"] = torch.float16
    if given.get("group_query_attention") and "num_query_groups" not in model_fields:
        model_fields["num_query_groups"] = 1  # Megatron's default for --num-query-groups
    if given.get("untie_embeddings_and_output_weights"):
        model_fields["tie_word_embeddings"] = False
    if "seed" in training:
        model_fields["init_seed"] = training["seed"]
    if given.get("use_rope_scaling"):
        factor = given.get("rope_scaling_factor") or _FLAG_ROPE.factor
        model_fields["rope_scaling"] = flag_rope_scaling(factor)
    elif given.get("rope_scaling_factor") is not None:
        raise ValueError("--rope-scaling-factor needs --use-rope-scaling")
    if given.get("model_provider"):
        family = load_model_provider(given["model_provider"])
        model_fields["family"] = family.name
        _check_used(family, fields["model"])
    model = _build_model(given.get("model_preset"), model_fields, training, fields["data"])
    # Megatron has no default sequence length; the model's full context is the natural one.
    training.setdefault("seq_length", model.max_position_embeddings)

    parallel = ParallelConfig(**fields["parallel"])
    parallel.virtual_pipeline_model_parallel_size = _virtual_size(given, model, parallel)
    return JobConfig(
        lora=_lora_config(given),
        model=model,
        parallel=parallel,
        optimizer=OptimizerConfig(**fields["optimizer"]),
        ddp=DistributedDataParallelConfig(**fields["ddp"]),
        training=TrainingConfig(**training),
        data=DataConfig(**fields["data"]),
        checkpoint=CheckpointConfig(**fields["checkpoint"]),
    )


def _lora_config(given: dict[str, Any]) -> LoraConfig | None:
    """``--lora-rank`` and its siblings; the siblings alone are a usage error."""
    siblings = [f"--lora-{k}" for k in ("alpha", "dropout", "target-modules")
                if given.get("lora_" + k.replace("-", "_")) is not None]  # fmt: skip
    if given.get("lora_rank") is None:
        if siblings:
            raise ValueError(f"{', '.join(siblings)} need --lora-rank")
        return None
    values: dict[str, Any] = {"rank": given["lora_rank"]}
    if given.get("lora_alpha") is not None:
        values["alpha"] = given["lora_alpha"]
    if given.get("lora_dropout") is not None:
        values["dropout"] = given["lora_dropout"]
    if given.get("lora_target_modules") is not None:
        names = given["lora_target_modules"].split(",")
        values["target_modules"] = tuple(n.strip() for n in names if n.strip())
    return LoraConfig(**values)


def _check_used(family: ModelFamily, model_fields: dict[str, Any]) -> None:
    """A flag for a field the model family ignores is an error, not a silent no-op."""
    flags = {field: flag for flag, section, field, _ in _FLAGS if section == "model"}
    unused = [flags[f] for f in family.unused_config_fields if f in model_fields and f in flags]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used by model family {family.name!r}")


def _build_model(
    preset: str | None,
    model_fields: dict[str, Any],
    training: dict[str, Any],
    data: dict[str, Any],
) -> ModelConfig:
    """The preset with the explicit fields over it, or a model from the flags alone."""
    if "vocab_size" in model_fields and data.get("tokenizer_model"):
        vocab = _tokenizer_vocab(data)
        if model_fields["vocab_size"] < vocab:  # the trainer takes the tokenizer's anyway
            raise ValueError(
                f"--vocab-size ({model_fields['vocab_size']}) is smaller than the vocabulary of "
                f"--tokenizer-model {data['tokenizer_model']} ({vocab}): its ids would not fit "
                "the embedding; leave --vocab-size out to use the tokenizer's"
            )
    if preset is not None:
        return ModelConfig.from_preset(preset, **model_fields)
    if "vocab_size" not in model_fields and data.get("tokenizer_model"):
        # As in Megatron, the vocabulary is the tokenizer's when no size is given.
        model_fields["vocab_size"] = _tokenizer_vocab(data)
    missing = [
        f"--{name.replace('_', '-')}"
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
        if name not in model_fields
    ]
    if missing:
        raise ValueError(
            f"the model needs {', '.join(missing)} (or --model-preset, one of {sorted(PRESETS)}; "
            "the vocabulary size can also come from --tokenizer-type/--tokenizer-model)"
        )
    h = model_fields["hidden_size"]
    # Megatron's SwiGLU default: 2/3 of 4h, rounded down to a multiple of 64.
    model_fields.setdefault("ffn_hidden_size", int(8 * h / 3) // 64 * 64)
    # Megatron's defaults: embeddings tied, positions up to the sequence length.
    model_fields.setdefault("tie_word_embeddings", True)
    if "seq_length" in training:
        model_fields.setdefault("max_position_embeddings", training["seq_length"])
    return ModelConfig(**model_fields)


def _tokenizer_vocab(data: dict[str, Any]) -> int:
    """The vocabulary size of the tokenizer the data flags name."""
    try:
        tokenizer = build_tokenizer(data.get("tokenizer_type", ""), data["tokenizer_model"])
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--tokenizer-model {data['tokenizer_model']}: cannot read its vocabulary size "
            f"({error}); give --vocab-size"
        ) from None
    return tokenizer.vocab_size


def _virtual_size(
    given: dict[str, Any], model: ModelConfig, parallel: ParallelConfig
) -> int | None:
    """The virtual pipeline size from either Megatron flag (None without interleaving)."""
    per_chunk = given.get("num_layers_per_virtual_pipeline_stage")
    chunks = given.get("num_virtual_stages_per_pipeline_rank")
    if per_chunk is not None and chunks is not None:
        raise ValueError(
            f"--num-layers-per-virtual-pipeline-stage ({per_chunk}) and "
            f"--num-virtual-stages-per-pipeline-rank ({chunks}) are exclusive"
        )
    if per_chunk is None:
        return chunks
    counts = model.layers_per_rank(parallel.pipeline_model_parallel_size)
    if (
        per_chunk < 1
        or any(count % per_chunk for count in counts)
        or len({count // per_chunk for count in counts}) > 1
    ):
        raise ValueError(
            f"--num-layers-per-virtual-pipeline-stage ({per_chunk}) must divide the layers of "
            f"every pipeline rank ({counts}) into the same number of chunks; use "
            "--num-virtual-stages-per-pipeline-rank with an uneven split"
        )
    return counts[0] // per_chunk


def job_to_dict(job: JobConfig) -> dict[str, dict[str, Any]]:
    """The job as plain values by section (dtypes as their names), e.g. for a checkpoint's
    metadata or a printed summary."""
    out = {}
    if job.lora is not None:
        out["lora"] = dataclasses.asdict(job.lora)
    for name in SECTIONS:
        section = dataclasses.asdict(getattr(job, name))
        out[name] = {
            key: str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
            for key, value in section.items()
        }
    return out
