"""Text normalisation before filtering and deduplication, and PII masking.

`normalize` applies, in this order, each step its `NormalizeConfig` turns on:

- HTML entities decoded (``&amp;`` -> ``&``, ``&#8217;`` -> ``'``), as web extractors leave
  them (``html.unescape``);
- Unicode normalisation, NFC by default (canonical composition: the same text, one encoding)
  or NFKC (also folds compatibility forms: full-width letters, ligatures), as FineWeb and
  CCNet do before hashing;
- control characters removed (category Cc except tab and newline, and Cf such as zero-width
  spaces and BOMs);
- whitespace: runs of spaces and tabs become one space, lines are stripped, runs of more than
  one empty line become one;
- boilerplate lines dropped, C4's rules (Raffel et al. 2020): lines containing "javascript" and
  cookie / privacy / terms-of-use notices.

`mask_pii` replaces e-mail and IP addresses (v4, and v6 in full or compressed form) by fixed
placeholders, as datatrove's PII formatter does.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from dataclasses import dataclass

# C4's policy substrings (c4_utils._is_policy_line) and its "javascript" rule.
BOILERPLATE_SUBSTRINGS = (
    "javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies",
    "use of cookies", "use cookies",
)  # fmt: skip

_SPACES = re.compile(r"[^\S\n]+")
_EMPTY_LINES = re.compile(r"\n{3,}")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[a-zA-Z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_IPV6 = re.compile(
    r"(?<![\w:])(?:(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}"
    r"|(?:[0-9a-fA-F]{1,4}:){1,7}:(?:[0-9a-fA-F]{1,4}(?::[0-9a-fA-F]{1,4}){0,6})?"
    r"|::(?:[0-9a-fA-F]{1,4}:){0,6}[0-9a-fA-F]{1,4})(?![\w:])"
)


@dataclass(frozen=True)
class NormalizeConfig:
    """Which normalisation steps run (module docstring), each on by default."""

    html_entities: bool = True
    unicode_form: str | None = "NFC"
    """"NFC", "NFKC" or None (``--unicode-form``)."""
    control_characters: bool = True
    whitespace: bool = True
    boilerplate_lines: bool = True

    def errors(self) -> list[str]:
        if self.unicode_form not in ("NFC", "NFKC", None):
            return [f"--unicode-form must be NFC, NFKC or none, got {self.unicode_form!r}"]
        return []


@functools.cache
def _control_characters() -> dict[int, None]:
    """``str.translate``'s table deleting Cc (but tab and newline) and Cf characters (built
    on first use: a tenth of a second over every code point)."""
    return {
        code: None
        for code in range(0x110000)
        if code not in (0x09, 0x0A) and unicodedata.category(chr(code)) in ("Cc", "Cf")
    }


def is_boilerplate_line(line: str) -> bool:
    """C4's line rules: a line naming javascript or a cookie / privacy / terms notice."""
    lower = line.lower()
    return any(part in lower for part in BOILERPLATE_SUBSTRINGS)


def normalize(text: str, config: NormalizeConfig) -> str:
    """``text`` through the steps ``config`` turns on (module docstring)."""
    if config.html_entities and "&" in text:
        text = html.unescape(text)
    if config.unicode_form is not None:
        text = unicodedata.normalize(config.unicode_form, text)  # type: ignore[arg-type]
    if config.control_characters:
        text = text.translate(_control_characters())
    if config.boilerplate_lines:
        text = "\n".join(line for line in text.split("\n") if not is_boilerplate_line(line))
    if config.whitespace:
        text = "\n".join(line.strip() for line in _SPACES.sub(" ", text).split("\n"))
        text = _EMPTY_LINES.sub("\n\n", text).strip()
    return text


EMAIL_PLACEHOLDER = "<EMAIL>"
IP_PLACEHOLDER = "<IP_ADDRESS>"


def mask_pii(text: str) -> tuple[str, int]:
    """``text`` with e-mail and IP addresses replaced by placeholders, and how many were."""
    text, emails = _EMAIL.subn(EMAIL_PLACEHOLDER, text)
    text, ipv4 = _IPV4.subn(IP_PLACEHOLDER, text)
    text, ipv6 = _IPV6.subn(IP_PLACEHOLDER, text)
    return text, emails + ipv4 + ipv6
