"""Publishing embedding shards: to a Hugging Face dataset repo or to a local folder with the same layout.

One call publishes many partitions in ONE commit (the Hub allows ~128 commits/hour/repo). A shard whose sha256
already equals the remote one is not uploaded, so re-publishing unchanged data makes no commit. Every commit
names its ``parent_commit``: a concurrent commit makes it fail with 412, and we re-read the head, recompute what
is still missing and try again. 429/5xx answers are retried with backoff (honouring ``Retry-After``); a failed
commit is never re-sent blindly: the head is re-read first, and the ``parent_commit`` guard turns a commit that
did land into a 412 followed by "nothing left to do".
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .errors import UserError
from .fs import HomePath, local_copies, sha256_file

SHARD_DIR = "data"
CARD_PATH = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
NOVELTY_DIR = "novelty"
REPO_PATH = re.compile(
    r"^(README\.md|data/embeddings-\d{9,12}-\d{9,12}\.parquet|novelty/novelty-\d{4}-\d{2}\.parquet)$")


class PublishError(UserError, RuntimeError):
    pass


class ConflictError(PublishError):
    """The branch moved since we read it (HTTP 412 on the Hub)."""


class TransientError(PublishError):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def token_from_env(required: bool = True) -> str | bool:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    if required:
        raise PublishError(
            "HF_TOKEN is not set: publishing to the Hub needs a token with write access in the environment "
            "(export HF_TOKEN=hf_...); tokens are never read from config files or metadata"
        )
    return False  # huggingface_hub: do not fall back to a cached login


def validate_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise PublishError(f"{repo_id!r} is not a valid Hub repo id (expected owner/name)")
    return repo_id


def validate_repo_path(path: str) -> str:
    if not REPO_PATH.match(path):
        raise PublishError(f"refusing to publish to unexpected repo path {path!r}")
    return path


def novelty_path(month: str) -> str:
    return validate_repo_path(f"{NOVELTY_DIR}/novelty-{month}.parquet")


def shard_path(range_key: str) -> str:
    return validate_repo_path(f"{SHARD_DIR}/embeddings-{range_key}.parquet")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # known for LFS files
    git_sha1: str | None  # known for regular files

    def matches(self, data_sha256: str, data_git_sha1: str | None = None) -> bool:
        if self.sha256 is not None:
            return self.sha256 == data_sha256
        return data_git_sha1 is not None and self.git_sha1 == data_git_sha1


@dataclass
class Shard:
    """A partition's shard: ``local`` None means the partition has no rows any more (delete remotely)."""

    range_key: str
    local: HomePath | None
    rows: int = 0
    sha256: str | None = None  # of ``local``, when the caller already hashed it (shards are hundreds of MB)
    repo_path: str | None = None  # default: the embeddings shard path of ``range_key``

    def local_sha256(self) -> str:
        return self.sha256 or sha256_file(self.local)

    @property
    def path_in_repo(self) -> str:
        return self.repo_path or shard_path(self.range_key)


class PublishTarget(Protocol):
    description: str

    def head(self) -> str | None: ...

    def remote_files(self, paths: list[str], revision: str | None) -> dict[str, RemoteFile]: ...

    def list_shards(self, revision: str | None) -> list[str]: ...

    def commit(self, adds: dict[str, Path | bytes], deletes: list[str], message: str, parent: str | None
               ) -> tuple[str, str]: ...


@dataclass
class PublishReport:
    target: str
    commit_sha: str | None = None  # the last commit made
    commit_url: str | None = None
    commits: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    conflicts: int = 0
    transient_retries: int = 0
    remote: dict[str, RemoteFile] = field(default_factory=dict)


CardBuilder = Callable[[list[str]], str]


# The Hub's guidance: at most ~100 files per commit (its commit call times out at ~60 s); ~128 commits/hour/repo.
MAX_FILES_PER_COMMIT = 100


def publish_shards(
    target: PublishTarget,
    shards: list[Shard],
    card_builder: CardBuilder | None,
    message: str,
    max_attempts: int = 6,
    backoff_seconds: float = 1.0,
    max_files_per_commit: int = MAX_FILES_PER_COMMIT,
) -> PublishReport:
    """Bring the target to the local shards: upload changed ones, delete emptied ones, skip the rest by sha256.

    Changes go in commits of at most ``max_files_per_commit`` files, the dataset card in the last one, so a first
    publish of hundreds of ranges is a few commits; an interrupted publish resumes where it stopped (what already
    landed matches by sha256 and is skipped)."""
    report = PublishReport(target=target.description)
    local_sha = {s.path_in_repo: s.local_sha256() for s in shards if s.local is not None}
    head = target.head()
    remote = target.remote_files([s.path_in_repo for s in shards], head)
    pending = [s for s in shards
               if (s.local is None and s.path_in_repo in remote)
               or (s.local is not None and not (s.path_in_repo in remote
                                               and remote[s.path_in_repo].matches(local_sha[s.path_in_repo])))]
    report.skipped = sorted(s.path_in_repo for s in shards if s not in pending and s.local is not None)
    size = max(1, max_files_per_commit)
    groups = [pending[i : i + size] for i in range(0, len(pending), size)] or [[]]
    for number, group in enumerate(groups, start=1):
        last = number == len(groups)
        label = message if len(groups) == 1 else f"{message} (part {number}/{len(groups)})"
        _publish_group(target, group, local_sha, card_builder if last else None, label, max_attempts,
                       backoff_seconds, report)
    report.remote = target.remote_files([s.path_in_repo for s in shards] + [CARD_PATH], report.commit_sha or head)
    return report


def _publish_group(target: PublishTarget, shards: list[Shard], local_sha: dict[str, str],
                   card_builder: CardBuilder | None, message: str, max_attempts: int, backoff_seconds: float,
                   report: PublishReport) -> None:
    for attempt in range(max_attempts):
        head = target.head()
        wanted = [s.path_in_repo for s in shards] + [CARD_PATH]
        remote = target.remote_files(wanted, head)
        adds: dict[str, Path | bytes] = {}
        uploaded, deleted = [], []
        for shard in shards:
            path = shard.path_in_repo
            if shard.local is None:
                if path in remote:
                    deleted.append(path)
            elif path in remote and remote[path].matches(local_sha[path]):
                report.skipped.append(path)  # landed already (a retried commit that did go through)
            else:
                adds[path] = shard.local
                uploaded.append(path)
        if card_builder is not None:
            present = (set(target.list_shards(head)) | set(adds)) - set(deleted)
            card = card_builder(sorted(present)).encode("utf-8")
            card_remote = remote.get(CARD_PATH)
            if card_remote is None or not card_remote.matches(sha256_bytes(card), git_blob_sha1(card)):
                adds[CARD_PATH] = card
        if not adds and not deleted:
            return
        try:
            with local_copies(adds) as files:  # shards of an object-storage home are uploaded from a local copy
                report.commit_sha, report.commit_url = target.commit(files, deleted, message, head)
                added_bytes = sum(len(v) if isinstance(v, bytes) else os.path.getsize(v)
                                  for k, v in files.items() if k != CARD_PATH)
        except ConflictError:
            report.conflicts += 1
            continue
        except TransientError as err:
            # Not re-sent as is: the next loop re-reads the head and recomputes; parent_commit makes a commit
            # that did land turn into a 412 + "nothing to do" instead of a duplicate.
            report.transient_retries += 1
            time.sleep(min(err.retry_after if err.retry_after is not None else backoff_seconds * 2**attempt, 30))
            continue
        report.commits.append(report.commit_sha)
        report.uploaded += uploaded
        report.deleted += deleted
        report.bytes_uploaded += added_bytes
        return
    raise PublishError(f"gave up publishing to {target.description} after {max_attempts} attempts "
                       f"({report.conflicts} conflicts, {report.transient_retries} transient errors)")
