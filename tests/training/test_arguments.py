"""Flags -> JobConfig: Megatron names land on the right fields, preset + overrides, YAML under
the command line, every validation error names its flag and value, derived batch sizes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engine.models.config import ModelConfig
from engine.parallel_state import ParallelConfig
from engine.training.arguments import _FLAGS, SECTIONS, build_parser, job_to_dict, parse_args
from engine.training.config import JobConfig, TrainingConfig
from tests.paths import SHARED_DATA

TINY = ["--model-preset", "tiny", "--train-iters", "10", "--seq-length", "64"]


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], **kwargs: int) -> str:
    """The message of the usage error that ``argv`` raises."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, **kwargs)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_every_flag_maps_to_an_existing_field_with_a_docstring():
    parser = build_parser()
    help_text = parser.format_help()
    for flag, section, field, _ in _FLAGS:
        assert field in {f.name for f in dataclasses.fields(SECTIONS[section])}
        assert flag in help_text
    # The issue's list of flags, each accepted.
    accepted = {option for action in parser._actions for option in action.option_strings}
    issue_flags = (
        "--num-layers --hidden-size --ffn-hidden-size --num-attention-heads --num-query-groups "
        "--group-query-attention --seq-length --max-position-embeddings --micro-batch-size "
        "--global-batch-size --tensor-model-parallel-size --pipeline-model-parallel-size "
        "--num-layers-per-virtual-pipeline-stage --decoder-first-pipeline-num-layers "
        "--decoder-last-pipeline-num-layers --sequence-parallel --recompute-granularity --lr "
        "--min-lr --lr-decay-style --lr-warmup-iters --lr-warmup-samples --lr-decay-iters "
        "--lr-decay-samples --weight-decay --clip-grad --adam-beta1 --adam-beta2 --adam-eps "
        "--bf16 --fp16 --loss-scale --initial-loss-scale --min-loss-scale --loss-scale-window "
        "--hysteresis --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather "
        "--ddp-bucket-size --train-iters --train-samples --eval-interval --eval-iters --save "
        "--load --save-interval --finetune --no-load-optim --no-load-rng --data-path --split "
        "--tokenizer-type --tokenizer-model --tensorboard-dir --log-interval --seed "
        "--exit-interval --exit-duration-in-mins --exit-on-nan --attention-backend "
        "--norm-backend --rotary-base --norm-epsilon --untie-embeddings-and-output-weights "
        "--make-vocab-size-divisible-by --peak-tflops --dry-run --model-preset --config "
        "--keep-last-n --data-cache-path --eod-mask-loss --sft --chat-template "
        "--wandb-project --wandb-exp-name --wandb-save-dir"
    ).split()
    assert set(issue_flags) <= accepted


def test_flags_land_on_their_fields():
    job = parse_args(
        TINY
        + "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel "
        "--recompute-granularity selective --lr 1e-3 --min-lr 1e-5 --lr-decay-style cosine "
        "--lr-warmup-iters 3 --weight-decay 0.1 --clip-grad 0.5 --adam-beta1 0.8 "
        "--adam-beta2 0.95 --adam-eps 1e-6 --bf16 --use-distributed-optimizer "
        "--overlap-grad-reduce --overlap-param-gather --ddp-bucket-size 1000 "
        "--micro-batch-size 2 --global-batch-size 16 --eval-interval 5 --eval-iters 2 "
        "--log-interval 1 --exit-interval 7 --exit-duration-in-mins 1.5 --exit-on-nan "
        "--seed 42 --peak-tflops 100 --tensorboard-dir tb --save ck --load ck "
        "--save-interval 5 --keep-last-n 2 --no-load-optim --no-load-rng "
        "--data-path 0.7 a 0.3 b --split 98,2,0 --data-cache-path cache "
        "--tokenizer-type Llama2Tokenizer --tokenizer-model t.model --eod-mask-loss --dry-run "
        "--attention-backend torch --norm-backend torch --rotary-base 500000 "
        "--norm-epsilon 1e-6".split()
    )
    assert job.parallel == ParallelConfig(2, 2, None)
    m, o, d, t = job.model, job.optimizer, job.ddp, job.training
    assert (m.sequence_parallel, m.recompute_granularity) == (True, "selective")
    assert (m.attention_backend, m.norm_backend) == ("torch", "torch")
    assert (m.rotary_base, m.norm_epsilon, m.init_seed) == (500000.0, 1e-6, 42)
    assert m.params_dtype == torch.bfloat16 and o.bf16 and not o.fp16
    assert (o.lr, o.min_lr, o.lr_decay_style, o.lr_warmup_iters) == (1e-3, 1e-5, "cosine", 3)
    assert (o.weight_decay, o.clip_grad, o.adam_beta1, o.adam_beta2, o.adam_eps) == (
        0.1, 0.5, 0.8, 0.95, 1e-6,
    )  # fmt: skip
    assert d.use_distributed_optimizer and d.overlap_grad_reduce and d.overlap_param_gather
    assert d.bucket_size == 1000
    assert (t.micro_batch_size, t.global_batch_size, t.seq_length, t.train_iters) == (2, 16, 64, 10)
    assert (t.eval_interval, t.eval_iters, t.log_interval, t.exit_interval) == (5, 2, 1, 7)
    assert (t.exit_duration_in_mins, t.exit_on_nan, t.seed, t.peak_tflops) == (1.5, True, 42, 100)
    assert (t.tensorboard_dir, t.dry_run) == ("tb", True)
    c = job.checkpoint
    assert (c.save, c.load, c.save_interval, c.keep_last_n) == ("ck", "ck", 5, 2)
    assert c.no_load_optim and c.no_load_rng and not c.finetune
    assert job.data.data_path == ["0.7", "a", "0.3", "b"]
    assert (job.data.split, job.data.data_cache_path, job.data.eod_mask_loss) == (
        "98,2,0", "cache", True,
    )  # fmt: skip
    job.validate(world_size=8)  # DP = 2
    assert job.num_microbatches(8) == 4  # 16 / (2 x 2)
    assert job_to_dict(job)["model"]["params_dtype"] == "bfloat16"


def test_preset_with_explicit_overrides():
    job = parse_args(["--model-preset", "llama2-7b", "--num-layers", "4", "--fp16"])
    assert job.model == ModelConfig.from_preset(
        "llama2-7b", num_layers=4, params_dtype=torch.float16
    )
    job = parse_args(["--model-preset", "llama3-8b", "--num-query-groups", "4"])
    assert (job.model.num_query_groups, job.model.rotary_base) == (4, 500000.0)


def test_model_from_flags_alone_takes_megatrons_defaults():
    base = "--num-layers 2 --hidden-size 4096 --num-attention-heads 32 --vocab-size 1000"
    job = parse_args(f"{base} --seq-length 1024".split())
    # SwiGLU's 2/3 x 4h rounded down to 64; tied embeddings; positions = seq length; MHA.
    assert job.model.ffn_hidden_size == 10880
    assert job.model.tie_word_embeddings
    assert job.model.max_position_embeddings == 1024
    assert job.model.num_query_groups == 32
    job = parse_args(
        f"{base} --untie-embeddings-and-output-weights --group-query-attention".split()
    )
    assert not job.model.tie_word_embeddings
    assert job.model.num_query_groups == 1  # Megatron's --num-query-groups default
    job = parse_args(f"{base} --group-query-attention --num-query-groups 8".split())
    assert job.model.num_query_groups == 8


TOKENIZER = SHARED_DATA / "llama2-tokenizer.model"


@pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} (../shared) is absent")
def test_vocabulary_from_the_tokenizer_without_a_preset(capsys):
    base = "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --tokenizer-type "
    job = parse_args(f"{base} Llama2Tokenizer --tokenizer-model {TOKENIZER}".split())
    assert job.model.vocab_size == 32000
    err = _usage_error(capsys, f"{base} Llama2Tokenizer --tokenizer-model /nonexistent".split())
    assert "--tokenizer-model /nonexistent" in err and "--vocab-size" in err


def test_virtual_pipeline_size_is_derived():
    argv = ["--model-preset", "llama2-7b", "--pipeline-model-parallel-size", "4"]
    job = parse_args(argv + ["--num-layers-per-virtual-pipeline-stage", "2"])
    assert job.parallel.virtual_pipeline_model_parallel_size == 4  # 32 / 4 ranks / 2
    job = parse_args(argv + ["--num-virtual-stages-per-pipeline-rank", "2"])
    assert job.parallel.virtual_pipeline_model_parallel_size == 2
    job = parse_args(argv)
    assert job.parallel.virtual_pipeline_model_parallel_size is None


def test_yaml_file_under_the_command_line(tmp_path: Path):
    config = tmp_path / "job.yaml"
    config.write_text(
        "model-preset: tiny\n"
        "tensor_model_parallel_size: 2\n"  # underscores accepted
        "micro-batch-size: 4\n"
        "lr: 0.01\n"
        "bf16: true\n"
        "sequence-parallel: false\n"
        "data-path: 0.7 a 0.3 b\n"
        "split: 98,2,0\n"
        "train-iters: 100\n"
    )
    job = parse_args(["--config", str(config), "--lr", "0.02", "--train-iters", "5"])
    assert job.parallel.tensor_model_parallel_size == 2
    assert job.training.micro_batch_size == 4
    assert job.optimizer.lr == 0.02 and job.training.train_iters == 5  # the CLI wins
    assert job.optimizer.bf16 and not job.model.sequence_parallel
    assert job.data.data_path == ["0.7", "a", "0.3", "b"]
    assert job.data.split == "98,2,0"
    config.write_text("model-preset: tiny\ndata_path: [0.5, a, 0.5, b]\n")
    assert parse_args(["--config", str(config)]).data.data_path == ["0.5", "a", "0.5", "b"]


def test_yaml_errors_name_the_key_and_the_file(tmp_path: Path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model-preset: tiny\nnum_layer: 3\n")
    err = _usage_error(capsys, ["--config", str(config)])
    assert "unknown key 'num_layer'" in err and str(config) in err
    config.write_text("num-layers: three\n")
    err = _usage_error(capsys, ["--config", str(config)])
    assert "--num-layers" in err and "'three'" in err and str(config) in err
    config.write_text("lr: [1, 2]\n")
    err = _usage_error(capsys, ["--config", str(config)])
    assert "'lr' takes one value" in err
    config.write_text("bf16: 1\n")
    err = _usage_error(capsys, ["--config", str(config)])
    assert "'bf16' is a switch" in err
    err = _usage_error(capsys, ["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in err


def test_command_line_errors_name_the_flag_and_value(capsys):
    err = _usage_error(capsys, ["--num-layers", "x"])
    assert "--num-layers" in err and "'x'" in err
    err = _usage_error(capsys, ["--recompute-granularity", "some"])
    assert "--recompute-granularity" in err and "'some'" in err
    err = _usage_error(capsys, ["--hidden-size", "64"])
    assert "--num-layers" in err and "--model-preset" in err
    err = _usage_error(capsys, [*TINY, "--num-layers-per-virtual-pipeline-stage", "3",
                                "--pipeline-model-parallel-size", "2"])  # fmt: skip
    assert "--num-layers" in err or "--num-layers-per-virtual-pipeline-stage" in err
    # With a world size, parse_args validates too.
    err = _usage_error(capsys, [*TINY, "--global-batch-size", "3"], world_size=2)
    assert "--global-batch-size (3)" in err


def _job(**training: object) -> JobConfig:
    fields = {"train_iters": 10, "seq_length": 64, **training}
    return JobConfig(ModelConfig.from_preset("tiny"), training=TrainingConfig(**fields))


def _error(argv: list[str], world_size: int = 1) -> str:
    job = parse_args(TINY + argv)
    with pytest.raises(ValueError) as error:
        job.validate(world_size)
    return str(error.value)


@pytest.mark.parametrize(
    "argv, world_size, message",
    [
        ("--micro-batch-size 2 --global-batch-size 6", 2,
         "--global-batch-size (6) must be a positive multiple of --micro-batch-size (2) x "
         "data-parallel size (2) = 4"),
        ("--train-samples 100", 1, "give one of --train-iters (10) and --train-samples (100)"),
        ("--bf16 --fp16", 1, "--fp16 and --bf16 are exclusive"),
        ("--save-interval 5", 1, "--save-interval (5) needs --save"),
        ("--keep-last-n 0 --save x", 1, "--keep-last-n must be at least 1, got 0"),
        ("--finetune", 1, "--finetune needs --load"),
        ("--min-lr 0.1 --lr 0.01", 1, "need 0 <= --min-lr (0.1) <= --lr (0.01)"),
        ("--lr-decay-style fast", 1, "--lr-decay-style 'fast' is not one of"),
        ("--lr-warmup-samples 10", 1,
         "--lr-warmup-samples (10) does not apply with --train-iters"),
        ("--lr-warmup-fraction 0.1 --lr-warmup-iters 3", 1,
         "--lr-warmup-fraction (0.1) and --lr-warmup-iters (3)"),
        ("--lr-decay-style WSD", 1, "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
        ("--overlap-param-gather", 1, "--overlap-param-gather needs --use-distributed-optimizer"),
        ("--ddp-bucket-size 0", 1, "--ddp-bucket-size must be positive, got 0"),
        ("--eval-interval 0", 1, "--eval-interval must be positive, got 0"),
        ("--data-path 0.7 a b c", 1, "'b' is not a weight"),
        ("--split 1,2,3,4", 1, "--split '1,2,3,4'"),
        ("--tokenizer-type Nope --tokenizer-model x", 1, "--tokenizer-type 'Nope' is not one of"),
        ("--tokenizer-type Llama2Tokenizer", 1, "--tokenizer-type (Llama2Tokenizer) and "
         "--tokenizer-model (None) go together"),
        ("--eod-mask-loss", 1, "--eod-mask-loss need the end-of-document id"),
        ("--sft --chat-template chatml", 1, "--chat-template 'chatml'"),
        ("--tensor-model-parallel-size 3", 3,
         "--num-attention-heads (4) must be divisible by --tensor-model-parallel-size (3)"),
        ("--seq-length 512", 1, "--seq-length (512) exceeds --max-position-embeddings (256)"),
        ("--tensor-model-parallel-size 2", 3,
         "world size (3) must be divisible by --tensor-model-parallel-size (2)"),
    ],
)  # fmt: skip
def test_validation_errors_name_flag_and_value(argv: str, world_size: int, message: str):
    assert message in _error(argv.split(), world_size)


def test_all_problems_are_reported_together():
    message = _error("--bf16 --fp16 --save-interval 3 --eval-iters -1".split())
    assert "--fp16 and --bf16" in message and "--save-interval (3) needs --save" in message
    assert "--eval-iters must be at least 0, got -1" in message


def test_run_length_is_required_unless_planning():
    job = parse_args(["--model-preset", "tiny"])
    assert job.training.seq_length == 256  # the preset's context when not given
    with pytest.raises(ValueError, match="give --train-iters or --train-samples"):
        job.validate(1)
    job.validate(1, require_train_length=False)
    assert parse_args(["--model-preset", "tiny", "--dry-run"], world_size=1).training.dry_run


def test_gradient_accumulation_is_derived():
    job = _job(micro_batch_size=2, global_batch_size=32)
    job.parallel = ParallelConfig(2, 2)
    assert job.data_parallel_size(16) == 4
    assert job.num_microbatches(16) == 4  # 32 / (2 x 4)
    assert job.global_batch_size(16) == 32
    job.training.global_batch_size = None  # Megatron's default: micro batch x DP
    assert job.global_batch_size(16) == 8 and job.num_microbatches(16) == 1
    with pytest.raises(ValueError, match=r"world size \(6\) must be divisible"):
        job.data_parallel_size(6)


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--num-attention-heads 0", "--num-attention-heads must be at least 1, got 0"),
        ("--num-query-groups 0", "--num-query-groups must be at least 1, got 0"),
        ("--make-vocab-size-divisible-by 0", "--make-vocab-size-divisible-by must be at least 1"),
        ("--hidden-size -64", "--hidden-size must be at least 1, got -64"),
        ("--hidden-size 0", "--hidden-size must be at least 1, got 0"),
        ("--ffn-hidden-size 0", "--ffn-hidden-size must be at least 1, got 0"),
        ("--vocab-size 0", "--vocab-size must be at least 1, got 0"),
        ("--norm-epsilon 0", "--norm-epsilon must be greater than 0, got 0.0"),
        ("--rotary-base -1", "--rotary-base must be greater than 0, got -1.0"),
        ("--attention-dropout 2", "--attention-dropout must be in [0, 1) (a probability), got 2.0"),
        ("--adam-beta1 2", "--adam-beta1 must be in [0, 1), got 2.0"),
        ("--adam-eps 0", "--adam-eps must be positive, got 0.0"),
        ("--weight-decay -1", "--weight-decay must be >= 0, got -1.0"),
        ("--fp16 --loss-scale 0", "--loss-scale must be positive, got 0.0"),
        ("--fp16 --loss-scale 1e-30", "--loss-scale 1e-30 with --fp16 scales the gradients down"),
        ("--min-loss-scale 0", "need 0 < --min-loss-scale (0.0) <= --initial-loss-scale"),
        ("--hysteresis 0", "--hysteresis must be at least 1, got 0"),
    ],
)
def test_values_out_of_range_are_usage_errors_naming_the_flag(capsys, flags, message):
    """Each of these used to crash with a traceback (heads 0: a division by zero) or to be
    accepted silently (and fail, or underflow, later)."""
    assert message in _usage_error(capsys, [*TINY, *flags.split()], world_size=1)


@pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} (../shared) is absent")
def test_a_vocab_size_smaller_than_the_tokenizers_is_an_error(capsys):
    tokenizer = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(TOKENIZER)]
    err = _usage_error(capsys, [*TINY, *tokenizer, "--vocab-size", "1000"])
    assert "--vocab-size (1000) is smaller than the vocabulary of --tokenizer-model" in err
    assert "(32000)" in err
    assert parse_args([*TINY, *tokenizer, "--vocab-size", "32000"]).model.vocab_size == 32000


def test_the_nan_check_is_on_by_default_and_has_megatrons_off_switch(tmp_path: Path):
    assert parse_args(TINY).training.check_for_nan_in_loss_and_grad is True
    off = parse_args(TINY + ["--no-check-for-nan-in-loss-and-grad"])
    assert off.training.check_for_nan_in_loss_and_grad is False
    config = tmp_path / "job.yaml"
    config.write_text("check-for-nan-in-loss-and-grad: false\nmax-consecutive-skipped-steps: 2\n")
    job = parse_args(TINY + ["--config", str(config)])
    assert job.training.check_for_nan_in_loss_and_grad is False
    assert job.training.max_consecutive_skipped_steps == 2
    job = parse_args(TINY + ["--distributed-timeout-minutes", "0.5"])
    assert job.training.distributed_timeout_minutes == 0.5


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            "--max-consecutive-skipped-steps -1",
            "--max-consecutive-skipped-steps must be at least 0",
        ),
        ("--distributed-timeout-minutes 0", "--distributed-timeout-minutes must be positive"),
    ],
)
def test_resilience_flags_out_of_range_are_usage_errors(capsys, flags, message):
    assert message in _usage_error(capsys, TINY + flags.split(), world_size=1)
