"""Corpus-id range partition keys: inclusive, zero-padded ``LO-HI`` strings such as ``000000000-000999999``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

KEY_DIGITS = 9
_KEY = re.compile(r"^(\d{9,12})-(\d{9,12})$")


class InvalidRangeKey(UserError, ValueError):
    pass


@dataclass(frozen=True, order=True)
class IdRange:
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.lo < 0 or self.hi < self.lo:
            raise InvalidRangeKey(f"invalid corpusid range {self.lo}-{self.hi}")

    @property
    def key(self) -> str:
        return f"{self.lo:0{KEY_DIGITS}d}-{self.hi:0{KEY_DIGITS}d}"

    def __contains__(self, corpusid: int) -> bool:
        return self.lo <= corpusid <= self.hi

    def __str__(self) -> str:
        return self.key


def parse_range(key: str) -> IdRange:
    """Parse a partition key or a CLI ``LO-HI`` argument; the strict form keeps keys safe to use in file names."""
    match = _KEY.match(key.strip())
    if not match:
        loose = re.match(r"^(\d+)-(\d+)$", key.strip())
        if not loose:
            raise InvalidRangeKey(f"{key!r} is not a corpusid range like 000000000-000999999")
        match = loose
    return IdRange(int(match.group(1)), int(match.group(2)))


def range_for(corpusid: int, width: int) -> IdRange:
    if width <= 0:
        raise ValueError("range width must be positive")
    lo = (corpusid // width) * width
    return IdRange(lo, lo + width - 1)

