"""Text rules: how a source row becomes the string SPECTER2 embeds (Semantic Scholar's own recipe).

Rules (each outcome is counted by the caller, nothing is dropped silently):
- Fields are cleaned: lone surrogates become U+FFFD, control characters become spaces, runs of white space
  collapse to one space, the ends are stripped. A field that is NULL or empty after cleaning is missing.
- title and abstract present  -> ``f"{title} {sep} {abstract}"``   (rule ``title_abstract``)
- title only                  -> ``title``                          (rule ``title_only``)
- abstract only               -> ``f"{sep} {abstract}"``            (rule ``abstract_only``: an empty title)
- neither                     -> skipped, reason ``no_text``
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_WHITESPACE = re.compile(r"\s+")
_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # exactly Unicode category Cc

TITLE_ABSTRACT = "title_abstract"
TITLE_ONLY = "title_only"
ABSTRACT_ONLY = "abstract_only"
RULES = (TITLE_ABSTRACT, TITLE_ONLY, ABSTRACT_ONLY)
SKIP_NO_TEXT = "no_text"


def clean_field(value: object) -> str | None:
    """Normalise one title/abstract value; ``None`` when nothing readable is left."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    text = _SURROGATES.sub("\ufffd", text)
    text = _WHITESPACE.sub(" ", _CONTROL.sub(" ", text)).strip()
    return text or None


@dataclass(frozen=True)
class PaperText:
    text: str | None
    rule: str  # one of RULES, or SKIP_NO_TEXT


def paper_text(title: object, abstract: object, sep_token: str) -> PaperText:
    clean_title, clean_abstract = clean_field(title), clean_field(abstract)
    if clean_title and clean_abstract:
        return PaperText(f"{clean_title} {sep_token} {clean_abstract}", TITLE_ABSTRACT)
    if clean_title:
        return PaperText(clean_title, TITLE_ONLY)
    if clean_abstract:
        return PaperText(f"{sep_token} {clean_abstract}", ABSTRACT_ONLY)
    return PaperText(None, SKIP_NO_TEXT)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
