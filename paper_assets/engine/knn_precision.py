"""Whether bf16 candidates pay on a set of prior papers, learnt from the device search's first passes."""

from __future__ import annotations

from dataclasses import dataclass

GIVE_UP_SHARE = 0.5  # a first pass that certifies fewer of its queries: the rest go to fp32 at once
JUDGED_FROM = 64  # queries a first pass needs for that judgement
MAX_SKIPPED_CALLS = 64


@dataclass
class LowPrecisionRecord:
    """Whether bf16 candidates pay on these priors. Vectors so alike that bf16 cannot tell a query's K nearest apart
    (its band holds nearly every prior) make a first pass certify few queries; then the rest go to fp32 at once and
    the next 1, 2, 4, ... calls (at most ``MAX_SKIPPED_CALLS``) search in fp32 only. The call after them tries bf16
    on ``JUDGED_FROM`` of its queries first (on such priors a full pass costs minutes: every score enters the band)
    and searches in bf16 only if that sample pays."""

    skips: int = 0
    backoff: int = 1

    @property
    def on_trial(self) -> bool:
        """Whether bf16 has not paid since it last gave up: a call tries it on a sample of its queries first."""
        return self.backoff > 1

    def record(self, failed_share: float) -> bool:
        """A first pass's share of uncertified queries; whether the rest of this call gives up on bf16."""
        if failed_share <= GIVE_UP_SHARE:
            self.backoff = 1
            return False
        self.skips, self.backoff = self.backoff, min(2 * self.backoff, MAX_SKIPPED_CALLS)
        return True

    def skip(self) -> bool:
        """Whether this call searches in fp32 only (counts the call)."""
        if self.skips:
            self.skips -= 1
            return True
        return False
