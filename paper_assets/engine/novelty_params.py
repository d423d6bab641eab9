"""Parameters of the paper index and the novelty metrics: their defaults are the settings' defaults, so this module
stays import-light (no numpy, FAISS or DuckDB) for ``settings`` and the CLI's start-up."""

from __future__ import annotations

from dataclasses import dataclass

SEARCH_MODES = ("auto", "device", "hnsw", "exact")
GRAPH_MODES = ("auto", "always", "never")
# auto without the device search: FAISS's exact search while a month's queries x prior papers stays under this (~80 s
# of fp32 products on 2 cores); beyond, the graph. At 300k papers exact search took 388 s for 36 months against the
# graph's 1,476 s (build included), and the graph's recall fell to 0.88 (BENCHMARKS.md).
EXACT_MAX_PAIRS = 10_000_000_000


@dataclass(frozen=True)
class IndexParams:
    """The authors' HNSW settings by default. ``graph``: ``auto`` builds the HNSW graph from ``graph_min_papers``
    papers on (below it exact search is faster than building and searching the graph: BENCHMARKS.md) where a month
    has more query x prior pairs than ``exact_max_pairs`` (no month below it reads the graph), unless the exact
    search on the embedding device is the default search (then nothing would read the graph); ``always`` or
    ``never``."""

    hnsw_m: int = 32
    ef_construction: int = 200
    graph: str = "auto"
    graph_min_papers: int = 1_000_000
    exact_max_pairs: int = EXACT_MAX_PAIRS

    def __post_init__(self):
        if self.graph not in GRAPH_MODES:
            raise ValueError(f"index graph must be auto, always or never, not {self.graph!r}")

    def builds_graph(self, papers: int, largest_month_pairs: int, device_search: bool = False) -> bool:
        return self.graph == "always" or (self.graph == "auto" and papers >= self.graph_min_papers
                                          and largest_month_pairs > self.exact_max_pairs and not device_search)


@dataclass(frozen=True)
class NoveltyParams:
    k: int = 100
    search: str = "auto"
    exact_max_pairs: int = EXACT_MAX_PAIRS
    ef_search: int = 50
    recall_sample: int = 256
    # The device search certifies every query itself, so FAISS's exact search audits a smaller sample of it: over
    # 2.36M papers a sample of 256 a month is ~1.4·10¹⁴ fp32 flops (~800 s on 2 cores), 64 a quarter of that.
    device_recall_sample: int = 64
    min_recall: float = 0.95
    first_month: str = ""  # "YYYY-MM": earlier months get no novelty partition (their papers stay prior papers)

    def __post_init__(self):
        if self.search not in SEARCH_MODES:
            raise ValueError(f"novelty search must be one of {', '.join(SEARCH_MODES)}, not {self.search!r}")
        if self.k < 1:
            raise ValueError("novelty k must be at least 1")
        if self.first_month and not (len(self.first_month) == 7 and self.first_month[4] == "-"
                                     and self.first_month.replace("-", "").isdigit()):
            raise ValueError(f"the first novelty month must read YYYY-MM, not {self.first_month!r}")

    def key(self) -> str:
        """What the results depend on (the search mode is not part of it: every mode estimates the same values)."""
        return f"k={self.k}"
