"""Where the tokens come from and how samples are cut: `DataConfig` (Megatron's data flags),
checked against the parsers and registries of this package."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from engine.data.blended_dataset import parse_data_path
from engine.data.chat_template import AUTO
from engine.data.gpt_dataset import parse_split
from engine.data.sft_dataset import chat_template_of
from engine.data.tokenizer import TOKENIZER_TYPES


@dataclass
class DataConfig:
    """Where the tokens come from and how samples are cut (Megatron's data flags)."""

    data_path: list[str] = dataclasses.field(default_factory=list)
    """Dataset prefixes (``.bin/.idx`` without the suffix), optionally blended with weights:
    ``["0.7", "a", "0.3", "b"]`` (``--data-path 0.7 a 0.3 b``)."""
    split: str = "969,30,1"
    """Relative sizes of the train, validation and test splits (``--split``)."""
    data_cache_path: str | None = None
    """Directory for the cached sample indices (``--data-cache-path``); None = beside the
    data."""
    tokenizer_type: str | None = None
    """Tokenizer family, e.g. ``Llama2Tokenizer``, ``HuggingFaceTokenizer``
    (``--tokenizer-type``)."""
    tokenizer_model: str | None = None
    """Tokenizer file or directory (``--tokenizer-model``)."""
    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token (``--reset-position-ids``)."""
    reset_attention_mask: bool = False
    """Block attention across documents (``--reset-attention-mask``)."""
    eod_mask_loss: bool = False
    """No loss on end-of-document tokens (``--eod-mask-loss``)."""
    sft: bool = False
    """Supervised fine-tuning data: chat conversations, loss on answers only (``--sft``)."""
    chat_template: str = "llama2"
    """How conversations are rendered for ``sft`` (``--chat-template``): ``auto`` (the Jinja
    template shipped beside ``--tokenizer-model``), a ``.jinja`` file, or a built-in name
    (``llama2``, ``plain``; `engine.data.sft_dataset.TEMPLATES`)."""
    num_workers: int = 2
    """Data-loader worker processes per rank (``--num-workers``)."""

    def errors(self) -> list[str]:
        """What is wrong with the blend weights, split, tokenizer, EOD options and chat
        template."""
        errors = []
        if self.data_path:
            try:
                parse_data_path(self.data_path)
            except ValueError as error:
                errors.append(str(error))
        try:
            parse_split(self.split)
        except ValueError as error:
            errors.append(str(error))
        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            errors.append(
                f"--tokenizer-type {self.tokenizer_type!r} is not one of "
                f"{', '.join(TOKENIZER_TYPES)}"
            )
        if (self.tokenizer_type is None) != (self.tokenizer_model is None):
            errors.append(
                f"--tokenizer-type ({self.tokenizer_type}) and --tokenizer-model "
                f"({self.tokenizer_model}) go together"
            )
        eod_options = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
        eod_flags = ["--" + name.replace("_", "-") for name in eod_options if getattr(self, name)]
        if eod_flags and self.tokenizer_type is None:
            errors.append(
                f"{', '.join(eod_flags)} need the end-of-document id: give --tokenizer-type and "
                "--tokenizer-model"
            )
        # The template is read here (a file or two), so a missing one fails before training.
        # `auto` reads beside the tokenizer: where its files are absent (a plan made elsewhere,
        # preprocessed data that needs no tokenizer) loading the tokenizer reports that.
        tokenizer_there = self.tokenizer_model is not None and Path(self.tokenizer_model).exists()
        if self.sft and (self.chat_template != AUTO or tokenizer_there):
            try:
                chat_template_of(self.chat_template, self.tokenizer_model)
            except ValueError as error:
                errors.append(str(error))
        if self.num_workers < 0:
            errors.append(f"--num-workers must be at least 0, got {self.num_workers}")
        return errors
