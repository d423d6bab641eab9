"""Semantic Scholar's public APIs: the Datasets API (releases, dataset files, diffs) and the Graph API's batch
endpoint for S2's own SPECTER2 vectors.

Formats, from S2's API docs (https://api.semanticscholar.org/api-docs/datasets and
https://api.semanticscholar.org/api-docs/graph):

- ``GET /datasets/v1/release/latest`` → ``{"release_id": "2024-11-05", "README": ..., "datasets": [...]}``;
  ``GET /datasets/v1/release/`` lists every release id.
- ``GET /datasets/v1/release/{id}/dataset/{name}`` → ``{"name", "description", "README", "files": [url, ...]}``:
  pre-signed URLs of gzipped JSON-lines files; full downloads need an ``x-api-key`` header.
- ``GET /datasets/v1/diffs/{start}/to/{end}/{name}`` → ``{"dataset", "start_release", "end_release", "diffs":
  [{"from_release", "to_release", "update_files": [url], "delete_files": [url]}]}``: in each diff, update records
  are inserted or replace the rows with the same primary key (``corpusid``), delete records name rows to remove.
- ``POST /graph/v1/paper/batch?fields=embedding.specter_v2`` with ``{"ids": ["CorpusId:123", ...]}`` (at most 500
  ids, 10 MB a response) → one entry per id in request order, ``null`` for unknown ids, else ``{"paperId",
  "embedding": {"model": "specter_v2", "vector": [768 floats]}}`` (``embedding`` may be ``null``).
- Keys get about one request per second; HTTP 429 asks the client to back off.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import requests

from .errors import UserError

DEFAULT_API = "https://api.semanticscholar.org"
BATCH_MAX_IDS = 500
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class S2ApiError(UserError):
    """S2 refused a request or kept failing; the message says which and what to check."""


@dataclass(frozen=True)
class DiffStep:
    from_release: str
    to_release: str
    update_files: tuple[str, ...]
    delete_files: tuple[str, ...]


class S2Client:
    """One HTTP session against S2 with the key, a minimum interval between requests and retries with backoff.

    ``min_interval`` spaces requests (S2 gives keys about one request per second); 429 and 5xx answers are retried
    ``retries`` times, waiting ``backoff`` seconds doubled each time (or the server's ``Retry-After``)."""

    def __init__(self, api_url: str = DEFAULT_API, api_key: str = "", min_interval: float = 1.0, retries: int = 6,
                 backoff: float = 1.0, timeout: float = 60.0, sleep: Callable[[float], None] = time.sleep):
        self.api_url = api_url.rstrip("/")
        self.min_interval, self.retries, self.backoff, self.timeout = min_interval, retries, backoff, timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["x-api-key"] = api_key
        self._sleep = sleep
        self._last_request = 0.0
        self.retried = 0

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        url = f"{self.api_url}{path}"
        for attempt in range(self.retries + 1):
            wait = self.min_interval - (time.monotonic() - self._last_request)
            if wait > 0:
                self._sleep(wait)
            self._last_request = time.monotonic()
            try:
                response = self.session.request(method, url, timeout=self.timeout, **kwargs)
            except requests.ConnectionError as err:
                if attempt == self.retries:
                    raise S2ApiError(f"cannot reach the S2 API at {self.api_url} ({err.__class__.__name__}); "
                                     "check PAPER_ASSETS_S2_API and the network") from err
                self._back_off(attempt, None)
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                self._back_off(attempt, response.headers.get("Retry-After"))
                continue
            if response.status_code in (401, 403):
                raise S2ApiError(f"S2 refused the API key (HTTP {response.status_code} for {path}): check S2_API_KEY")
            if response.status_code == 404:
                raise S2ApiError(f"S2 has no {path} (HTTP 404): check the release id and dataset name")
            if response.status_code >= 400:
                raise S2ApiError(f"S2 answered HTTP {response.status_code} for {path} after {attempt} retries: "
                                 f"{response.text[:200]}")
            return response
        raise AssertionError("unreachable")

    def _back_off(self, attempt: int, retry_after: str | None) -> None:
        self.retried += 1
        seconds = self.backoff * 2 ** attempt
        if retry_after and retry_after.isdigit():
            seconds = max(seconds, float(retry_after))
        self._sleep(seconds)

    # Datasets API

    def latest_release(self) -> str:
        return str(self.request("GET", "/datasets/v1/release/latest").json()["release_id"])

    def dataset_files(self, release: str, dataset: str) -> list[str]:
        return list(self.request("GET", f"/datasets/v1/release/{release}/dataset/{dataset}").json()["files"])

    def diffs(self, start: str, end: str, dataset: str) -> list[DiffStep]:
        body = self.request("GET", f"/datasets/v1/diffs/{start}/to/{end}/{dataset}").json()
        return [DiffStep(d["from_release"], d["to_release"], tuple(d.get("update_files", ())),
                         tuple(d.get("delete_files", ()))) for d in body["diffs"]]

    # Graph API

    def specter_v2(self, corpusids: Sequence[int]) -> dict[int, np.ndarray | None]:
        """S2's SPECTER2 vector of each id (``None`` where S2 knows no such paper or has no vector)."""
        found: dict[int, np.ndarray | None] = {}
        for start in range(0, len(corpusids), BATCH_MAX_IDS):
            chunk = [int(i) for i in corpusids[start:start + BATCH_MAX_IDS]]
            answer = self.request("POST", "/graph/v1/paper/batch", params={"fields": "embedding.specter_v2"},
                                  json={"ids": [f"CorpusId:{i}" for i in chunk]}).json()
            if len(answer) != len(chunk):
                raise S2ApiError(f"S2's batch endpoint answered {len(answer)} entries for {len(chunk)} ids")
            for corpusid, entry in zip(chunk, answer, strict=True):
                vector = ((entry or {}).get("embedding") or {}).get("vector")
                found[corpusid] = np.asarray(vector, dtype=np.float32) if vector else None
        return found
