"""Jinja chat templates: finding the tokenizer's own, rendering it as transformers does, and
telling which tokens of a rendering are the assistant's.

**Where `--chat-template auto` looks.** In the directory of ``--tokenizer-model`` (the
directory itself, or the folder of a file such as ``tokenizer.model``): ``chat_template.jinja``
first (it takes priority, as in transformers), then the ``chat_template`` key of
``tokenizer_config.json`` (a string, or a list of ``{"name", "template"}`` of which ``default``
is used). Any other value that is not a built-in template name is a path to a template file.

**Rendering** follows transformers' ``apply_chat_template``: an immutable sandboxed Jinja
environment (a template from the Hub is untrusted code) with ``trim_blocks`` and
``lstrip_blocks`` and the ``loopcontrols`` extension; ``raise_exception(message)``;
``strftime_now(format)``; a ``tojson`` filter that leaves non-ASCII and ``<>&`` as they are;
and the variables ``messages``, ``tools`` and ``documents`` (None), ``add_generation_prompt``
and every special token ``tokenizer_config.json`` names (``bos_token``, ``eos_token``, ...).
The text is tokenized as written (`Tokenizer.tokenize_with_offsets`: no BOS added, the text of
a special token encoded to its id), which is transformers' ``add_special_tokens=False``.

**The assistant's tokens** (the SFT loss mask) come from the rendering, never from token ids:

- A template with ``{% generation %}...{% endgeneration %}`` blocks: exactly the text inside
  the blocks, as transformers' ``return_assistant_tokens_mask=True``. Whatever end-of-turn
  text the template puts inside the block is learned; what it puts after the block is not.
- Any other template, turn by turn: for the assistant message ``i``, render ``messages[:i]``
  with the generation prompt and ``messages[:i + 1]`` without it; the assistant's text is what
  the second adds to the first, less trailing whitespace. It holds the reply and the
  end-of-turn text the template writes after it (``<|eot_id|>``, ``<|im_end|>``, ``</s>``), so
  the model learns to stop; the newline ChatML writes after ``<|im_end|>`` is left out, which
  gives the mask of the same template with a generation block around the reply and its
  ``<|im_end|>``. A template whose renderings of the prefixes are not prefixes of the whole
  (one that rewrites earlier turns) is refused: give it generation blocks.

A token is the assistant's when its character span overlaps the assistant's text (a token
that straddles the edge counts, as in transformers).

**End of turn** (where generation stops, `stop_ids`): the tokenizer's EOS, the
``eos_token`` of ``tokenizer_config.json``, and the last token of the text the template
writes after an assistant reply (found by rendering a probe conversation turn by turn).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import numpy as np

from engine.data.tokenizer import Tokenizer, read_json, token_text

AUTO = "auto"
"""``--chat-template auto``: the template shipped with the tokenizer."""
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"

# Private-use characters wrapped around the output of generation blocks while rendering (and
# removed from the messages first, so no input can forge a span).
_START, _END = "\U00100000", "\U00100001"
_MARKS = re.compile(f"[{_START}{_END}]")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE_REPLY = "Hello there."


@dataclass(frozen=True)
class JinjaChatTemplate:
    """A Jinja chat template with the special tokens it is rendered with."""

    source: str
    """The template text."""
    origin: str
    """Where it was read from, for messages (a file, or ``tokenizer_config.json``'s key)."""
    special_tokens: dict[str, str]
    """Template variables such as ``bos_token`` and ``eos_token`` (tokenizer_config.json)."""

    @property
    def has_generation_blocks(self) -> bool:
        """Whether the template marks the assistant's text with ``{% generation %}``."""
        return _GENERATION_TAG.search(self.source) is not None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (with the assistant header after it when asked)."""
        return self._render(messages, add_generation_prompt)[0]

    def assistant_spans(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendering and the character spans ``[start, end)`` of the assistant's text in
        it, by the generation blocks or turn by turn (the rules in the module docstring)."""
        text, spans = self._render(messages, add_generation_prompt)
        if self.has_generation_blocks:
            return text, spans
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(prefix) and text.startswith(through)):
                raise ValueError(
                    f"chat template {self.origin}: rendering the conversation up to message {i} "
                    "(assistant) does not give a prefix of the whole rendering, so its "
                    "assistant text cannot be found turn by turn; wrap the assistant's text in "
                    "{% generation %}...{% endgeneration %} in the template"
                )
            turn = through[len(prefix) :].rstrip()
            spans.append((len(prefix), len(prefix) + len(turn)))
        return text, spans

    def end_of_turn_text(self) -> str:
        """What the template writes after an assistant reply, less trailing whitespace
        (``<|eot_id|>``, ``<|im_end|>``, `` </s>``); "" when nothing or not found."""
        probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE_REPLY}]
        prefix = self.render(probe[:1], add_generation_prompt=True)
        through = self.render(probe)
        if not through.startswith(prefix):
            return ""
        turn = through[len(prefix) :].rstrip()
        at = turn.rfind(_PROBE_REPLY)
        return turn[at + len(_PROBE_REPLY) :] if at >= 0 else ""

    def _render(
        self, messages: Sequence[dict], add_generation_prompt: bool
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendering and the spans of its generation blocks (none without blocks)."""
        template = _compile(self.source)
        marked = template.render(
            messages=_clean(list(messages)),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )
        return _unmark(marked)


def tokenizer_directory(tokenizer_model: str | os.PathLike) -> Path:
    """The directory of ``--tokenizer-model`` (itself, or the folder of the file it names)."""
    path = Path(tokenizer_model)
    return path if path.is_dir() else path.parent


def load_chat_template(spec: str, tokenizer_model: str | os.PathLike | None) -> JinjaChatTemplate:
    """The template of ``--chat-template`` `spec`: ``auto`` (the tokenizer's) or a file.

    Special tokens come from the tokenizer_config.json beside ``--tokenizer-model`` (none
    without one). The template is compiled here, so a syntax error is raised now.

    Raises:
        ValueError: no template (naming the files looked at), no such file, or bad syntax.
    """
    directory = None if tokenizer_model is None else tokenizer_directory(tokenizer_model)
    config = {} if directory is None else read_json(directory / CONFIG_FILE)
    if spec == AUTO:
        if directory is None:
            raise ValueError(
                "--chat-template auto uses the template beside the tokenizer: give "
                "--tokenizer-model"
            )
        source, origin = _template_beside_tokenizer(directory, config)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--chat-template {spec!r}: no such template file")
        source, origin = path.read_text(encoding="utf-8"), str(path)
    try:
        _compile(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat template {origin}: line {error.lineno}: {error.message}") from None
    return JinjaChatTemplate(source, origin, _special_tokens(config))


def encode_chat(
    template: JinjaChatTemplate,
    messages: Sequence[dict],
    tokenizer: Tokenizer,
    add_generation_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[n]`` (int64) of the rendered conversation and its loss mask ``[n]``
    (uint8, 1 on the assistant's tokens)."""
    text, spans = template.assistant_spans(messages, add_generation_prompt)
    ids, offsets = tokenizer.tokenize_with_offsets(text)
    return np.asarray(ids, np.int64), np.asarray(token_mask(offsets, spans), np.uint8)


def encode_prompt(
    template: JinjaChatTemplate, messages: Sequence[dict], tokenizer: Tokenizer
) -> tuple[list[int], str]:
    """Ids and text of the conversation with the generation prompt after it (to generate the
    assistant's reply: no mask is computed, so any template works)."""
    text = template.render(messages, add_generation_prompt=True)
    return tokenizer.tokenize_with_offsets(text)[0], text


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character span overlaps one of `spans` (both in order)."""
    mask = [0] * len(offsets)
    at = 0
    for token, (start, end) in enumerate(offsets):
        while at < len(spans) and start >= spans[at][1]:
            at += 1
        if at == len(spans):
            break
        if end > spans[at][0]:
            mask[token] = 1
    return mask


def stop_ids(template: JinjaChatTemplate, tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant turn (sorted): the tokenizer's EOS, tokenizer_config.json's
    ``eos_token``, and the last token of the template's end-of-turn text."""
    stops = {tokenizer.eod}
    for text in (template.special_tokens.get("eos_token"), template.end_of_turn_text()):
        if text:
            ids, _ = tokenizer.tokenize_with_offsets(text)
            stops.update(ids[-1:])
    return sorted(stops)


def _template_beside_tokenizer(directory: Path, config: dict) -> tuple[str, str]:
    """(source, origin) of the template shipped in `directory`; ValueError naming both places
    looked at when there is none."""
    file = directory / TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8"), str(file)
    entry = config.get("chat_template")
    origin = f"{directory / CONFIG_FILE} (chat_template)"
    if isinstance(entry, str):
        return entry, origin
    if isinstance(entry, list):  # several named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in entry if isinstance(t, dict)}
        default = named.get("default")
        if isinstance(default, str):
            return default, f"{origin}, 'default'"
    raise ValueError(
        f"--chat-template auto: the tokenizer ships no chat template (looked for {file} and "
        f"the chat_template key of {directory / CONFIG_FILE}); give a .jinja file or a "
        "built-in template name to --chat-template"
    )


def _special_tokens(config: dict) -> dict[str, str]:
    """Every named special token of a tokenizer_config.json (the ``*_token`` keys and the
    ``extra_special_tokens`` mapping), as the template variables transformers passes."""
    named = {key: value for key, value in config.items() if key.endswith("_token")}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        named.update(extra)
    tokens = {key: token_text(value) for key, value in named.items()}
    # add_bos_token (a bool) ends in _token too; only the strings are tokens.
    return {key: text for key, text in tokens.items() if isinstance(text, str)}


class _GenerationBlocks(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: wraps what the assistant generates in
    marks that `_unmark` turns into spans (and removes)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_mark")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        return _START + caller() + _END


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, > and & for HTML, which a prompt must not see.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)


def _clean(value: Any) -> Any:
    """Messages as the template sees them: keys whose value is None dropped (as transformers
    does: templates test for a missing key, not for None), and no marks in any string."""
    if isinstance(value, str):
        return _MARKS.sub("", value)
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def _unmark(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without generation marks, and the spans the outermost marks enclosed."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    length, depth, start, at = 0, 0, 0, 0
    for match in _MARKS.finditer(marked):
        pieces.append(marked[at : match.start()])
        length += match.start() - at
        at = match.end()
        if match.group() == _START:
            depth += 1
            start = length if depth == 1 else start
        elif depth > 0:
            depth -= 1
            if depth == 0 and length > start:
                spans.append((start, length))
    pieces.append(marked[at:])
    return "".join(pieces), spans
