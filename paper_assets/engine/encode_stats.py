"""What an encoder reports about the rows it embedded; torch-free, so that the pipeline and the Dagster layer can
carry it without importing the model libraries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EncodeStats:
    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    forward_seconds: float = 0.0
    nan_batches_recomputed: int = 0
    oom_splits: int = 0
    truncated_rows: int = 0

    def add(self, other: EncodeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def token_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0
