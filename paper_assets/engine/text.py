"""Text rules: how a source row becomes the string SPECTER2 embeds (Semantic Scholar's own recipe).

Rules (each outcome is counted by the caller, nothing is dropped silently):
- Fields are normalised the way SPECTER2's (BERT) tokenizer normalises them, so the stored text is exactly what
  the model reads and vectors equal the notebook's: characters of Unicode category C (control, format, private
  use, unassigned, lone surrogates) and U+FFFD are deleted, tab / newline / carriage return and other white space
  count as white space, runs of white space collapse to one space, the ends are stripped. A field that is NULL or
  empty after this is missing. (Deleting, not spacing, matters: mojibake such as ``typingâ\\x80\\x94relational``
  is one word to the tokenizer.)
- title and abstract present  -> ``f"{title} {sep} {abstract}"``   (rule ``title_abstract``)
- title only                  -> ``title``                          (rule ``title_only``)
- abstract only               -> ``f"{sep} {abstract}"``            (rule ``abstract_only``: an empty title)
- neither                     -> skipped, reason ``no_text``

The rules run column-wise on Arrow arrays (RE2 kernels in pyarrow); the scalar helpers below are the same code on
one-element arrays.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

# Lone surrogates cannot exist in Arrow (UTF-8) strings; Python strings (JSONL input) may carry them.
_SURROGATES = re.compile("[\ud800-\udfff]")
# Category C but tab / newline / return (those are white space to the tokenizer), and U+FFFD.
_DELETED = r"[^\P{C}\t\n\r]|\x{FFFD}"
# RE2's \s is [\t\n\f\r ]. Only the white space that changes is matched: a run of two or more, or one character
# that is not a plain space. Matching every single space (``[\s\pZ]+``, same result) made this pass ~8x slower,
# half of building a papers file.
_WHITESPACE_TO_SPACE = r"[\s\pZ]{2,}|[\t\n\f\r]|[^\P{Z} ]"

TITLE_ABSTRACT = "title_abstract"
TITLE_ONLY = "title_only"
ABSTRACT_ONLY = "abstract_only"
RULES = (TITLE_ABSTRACT, TITLE_ONLY, ABSTRACT_ONLY)
SKIP_NO_TEXT = "no_text"


def drop_surrogates(text: str) -> str:
    return _SURROGATES.sub("", text)


def clean_column(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Normalised strings; null where nothing readable is left."""
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        values = pc.cast(values, pa.string())
    text = pc.replace_substring_regex(values, _DELETED, "")
    text = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, _WHITESPACE_TO_SPACE, " "))
    return pc.if_else(pc.equal(pc.utf8_length(text), 0), pa.scalar(None, text.type), text)


def paper_texts(titles: pa.Array, abstracts: pa.Array, sep_token: str) -> tuple[pa.Array, pa.Array]:
    """(text, rule) per row; text is null exactly where rule is ``no_text``."""
    title, abstract = clean_column(titles), clean_column(abstracts)
    has_title, has_abstract = pc.is_valid(title), pc.is_valid(abstract)
    both = pc.and_(has_title, has_abstract)
    text = pc.coalesce(
        pc.binary_join_element_wise(title, abstract, f" {sep_token} "),
        title,
        pc.binary_join_element_wise(pa.scalar(sep_token), abstract, " "),
    )
    rule = pc.case_when(
        pc.make_struct(both, has_title, has_abstract, field_names=["both", "title", "abstract"]),
        TITLE_ABSTRACT, TITLE_ONLY, ABSTRACT_ONLY, SKIP_NO_TEXT,
    )
    return text, rule


def clean_field(value: object) -> str | None:
    """One value through :func:`clean_column`."""
    if value is None:
        return None
    text = drop_surrogates(value if isinstance(value, str) else str(value))
    return clean_column(pa.array([text], pa.string()))[0].as_py()


@dataclass(frozen=True)
class PaperText:
    text: str | None
    rule: str  # one of RULES, or SKIP_NO_TEXT


def paper_text(title: object, abstract: object, sep_token: str) -> PaperText:
    """One row through :func:`paper_texts`."""
    fields = [None if v is None else drop_surrogates(v if isinstance(v, str) else str(v)) for v in (title, abstract)]
    text, rule = paper_texts(pa.array([fields[0]], pa.string()), pa.array([fields[1]], pa.string()), sep_token)
    return PaperText(text[0].as_py(), rule[0].as_py())


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
