"""The two places shards are published to: a Hugging Face dataset repo (:class:`HubTarget`, through
``huggingface_hub``) and a local folder with the same layout (:class:`LocalFolderTarget`). Both implement
``publish.PublishTarget``; ``publish.publish_shards`` decides what to send."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .fs import FileLock, atomic_path, sha256_file
from .publish import (
    CARD_PATH,
    REPO_PATH,
    SHARD_DIR,
    ConflictError,
    PublishError,
    RemoteFile,
    TransientError,
    sha256_bytes,
    token_from_env,
    validate_repo_id,
    validate_repo_path,
)


class LocalFolderTarget:
    """A folder laid out like a Hub dataset repo; commits are recorded in ``.commits.jsonl``."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.description = f"folder {self.root}"
        self._log = self.root / ".commits.jsonl"

    def _file(self, path: str) -> Path:
        resolved = (self.root / validate_repo_path(path)).resolve()
        if self.root not in resolved.parents:
            raise PublishError(f"{path!r} escapes {self.root}")
        return resolved

    def head(self) -> str | None:
        if not self._log.exists():
            return None
        lines = self._log.read_text(encoding="utf-8").splitlines()
        return json.loads(lines[-1])["commit"] if lines else None

    def remote_files(self, paths: list[str], revision: str | None = None) -> dict[str, RemoteFile]:
        found = {}
        for path in paths:
            file = self._file(path)
            if file.exists():
                found[path] = RemoteFile(path, file.stat().st_size, sha256_file(file), None)
        return found

    def list_shards(self, revision: str | None = None) -> list[str]:
        return sorted(f"{SHARD_DIR}/{p.name}" for p in (self.root / SHARD_DIR).glob("embeddings-*.parquet"))

    def commit(self, adds, deletes, message, parent):
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / ".lock"):
            if self.head() != parent:
                raise ConflictError(f"{self.description} moved since {parent}")
            for path, content in adds.items():
                with atomic_path(self._file(path)) as tmp:
                    tmp.write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
            for path in deletes:
                self._file(path).unlink(missing_ok=True)
            record = {"parent": parent, "message": message, "added": sorted(adds), "deleted": sorted(deletes),
                      "sha256": {p: self.remote_files([p])[p].sha256 for p in sorted(adds)}}
            commit = sha256_bytes(json.dumps(record, sort_keys=True).encode())[:40]
            with open(self._log, "a", encoding="utf-8") as log:
                log.write(json.dumps({"commit": commit, **record}, sort_keys=True) + "\n")
                log.flush()
                os.fsync(log.fileno())
        return commit, self.root.as_uri()


# huggingface_hub uploads several LFS files through tqdm's thread_map, whose class-level lock handling races when two
# threads of one process upload at once (AttributeError: 'tqdm' has no attribute '_lock'). Commits from one process
# are therefore serialised; separate processes (Dagster runs) still publish concurrently.
_COMMIT_LOCK = threading.Lock()


def _redact(text: str) -> str:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    text = text.replace(token, "***") if token else text
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


class HubTarget:
    """A Hub dataset repo through ``huggingface_hub.HfApi`` (created if missing)."""

    def __init__(self, repo_id: str, revision: str = "main", private: bool = False, endpoint: str | None = None,
                 max_read_retries: int = 5, backoff_seconds: float = 1.0, token: str | None = None):
        from huggingface_hub import HfApi

        self.repo_id = validate_repo_id(repo_id)
        self.revision = revision
        self.private = private
        self.api = HfApi(endpoint=endpoint, token=token or token_from_env(required=True))
        self.description = f"hf://datasets/{repo_id}@{revision}"  # same words as the resource's description()
        self.max_read_retries = max_read_retries
        self.backoff_seconds = backoff_seconds
        self._ready = False

    def _classify(self, err: Exception) -> Exception:
        """Map an error (and the errors it wraps, e.g. a failed LFS upload) to Conflict/Transient/PublishError."""
        import requests

        chain, seen = [], err
        while seen is not None and len(chain) < 10:
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        message = _redact("; ".join(f"{type(e).__name__}: {e}" for e in chain))
        for inner in chain:
            response = getattr(inner, "response", None)
            status = getattr(response, "status_code", None)
            if status == 412:
                return ConflictError(message)
            if status == 429 or (status is not None and status >= 500):
                retry_after = response.headers.get("Retry-After")
                try:
                    seconds = float(retry_after) if retry_after is not None else None
                except ValueError:
                    seconds = None
                return TransientError(message, seconds)
            if status in (401, 403):
                return PublishError(f"the Hub refused the token for {self.repo_id} ({status}); check HF_TOKEN's rights")
            if isinstance(inner, requests.ConnectionError | requests.Timeout):
                return TransientError(message)
        return PublishError(message)

    def _read(self, call: Callable):
        for attempt in range(self.max_read_retries + 1):
            try:
                return call()
            except Exception as err:  # noqa: BLE001 - classified below, unknown errors re-raised redacted
                mapped = self._classify(err)
                if not isinstance(mapped, TransientError) or attempt == self.max_read_retries:
                    raise mapped from None
                time.sleep(min(mapped.retry_after if mapped.retry_after is not None
                               else self.backoff_seconds * 2**attempt, 30))
        raise AssertionError("unreachable")

    def _ensure_repo(self) -> None:
        if self._ready:
            return
        self._read(lambda: self.api.create_repo(self.repo_id, repo_type="dataset", private=self.private,
                                                exist_ok=True))
        if self.revision != "main":
            self._read(lambda: self.api.create_branch(self.repo_id, branch=self.revision, repo_type="dataset",
                                                      exist_ok=True))
        self._ready = True

    def head(self) -> str | None:
        self._ensure_repo()
        return self._read(lambda: self.api.repo_info(self.repo_id, repo_type="dataset", revision=self.revision).sha)

    def remote_files(self, paths: list[str], revision: str | None) -> dict[str, RemoteFile]:
        infos = self._read(lambda: self.api.get_paths_info(
            self.repo_id, paths, repo_type="dataset", revision=revision or self.revision))
        found = {}
        for info in infos:
            if getattr(info, "blob_id", None) is None:
                continue  # a folder
            lfs = getattr(info, "lfs", None)
            found[info.path] = RemoteFile(info.path, info.size, lfs.sha256 if lfs else None,
                                          None if lfs else info.blob_id)
        return found

    def list_shards(self, revision: str | None) -> list[str]:
        from huggingface_hub.utils import EntryNotFoundError

        def listing():
            try:
                return [f.path for f in self.api.list_repo_tree(
                    self.repo_id, path_in_repo=SHARD_DIR, repo_type="dataset", revision=revision or self.revision)]
            except EntryNotFoundError:
                return []

        return sorted(p for p in self._read(listing) if REPO_PATH.match(p) and p != CARD_PATH)

    def commit(self, adds, deletes, message, parent):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=c if isinstance(c, bytes) else str(c))
                      for p, c in sorted(adds.items())]
        operations += [CommitOperationDelete(path_in_repo=p) for p in sorted(deletes)]
        try:
            with _COMMIT_LOCK:
                info = self.api.create_commit(self.repo_id, operations, commit_message=message, repo_type="dataset",
                                              revision=self.revision, parent_commit=parent)
        except Exception as err:  # noqa: BLE001 - mapped to Conflict/Transient/PublishError, token redacted
            raise self._classify(err) from None
        return info.oid, info.commit_url
