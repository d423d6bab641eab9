"""The layout of the project home (``PAPER_ASSETS_HOME``): where each kind of file lives, and which part of an
object-storage home stays on this machine (``PAPER_ASSETS_LOCAL_HOME``: the DuckDB catalog file, the Dagster instance
folder, locks, CPU calibration, caches)."""

from __future__ import annotations

import os
from pathlib import Path

from .fs import FileLock, HomePath, home_location, is_local, register_home_filesystem
from .ranges import IdRange

LOCAL_HOME_ENV = "PAPER_ASSETS_LOCAL_HOME"


def default_local_home(root: HomePath) -> Path:
    """Where an object-storage home keeps this machine's part: ``$PAPER_ASSETS_LOCAL_HOME``, else a folder under
    the user's cache named after the bucket and prefix."""
    if os.environ.get(LOCAL_HOME_ENV):
        return Path(os.environ[LOCAL_HOME_ENV]).resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "paper_assets" / root.protocol / root.path.strip("/")).resolve()


class ProjectHome:
    """The layout of ``PAPER_ASSETS_HOME``.

    ``root`` holds the shared data (a local folder or an object-storage prefix); ``local`` holds what belongs to
    this machine. For a local home they are the same folder, so its layout is what it always was."""

    def __init__(self, root: str | os.PathLike, local: str | os.PathLike | None = None):
        self.root = home_location(root)
        if local is not None:
            self.local = Path(local).resolve()
        else:
            self.local = self.root if is_local(self.root) else default_local_home(self.root)

    @property
    def remote(self) -> bool:
        return not is_local(self.root)

    def _inside(self, path: HomePath) -> HomePath:
        if not is_local(path):
            if ".." in path.parts:
                raise ValueError(f"{path} escapes the project home {self.root}")
            return path
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ValueError(f"{path} escapes the project home {self.root}")
        return resolved

    @property
    def papers_dir(self) -> HomePath:
        return self.root / "papers"

    @property
    def embeddings_dir(self) -> HomePath:
        return self.root / "embeddings"

    @property
    def source_dir(self) -> HomePath:
        return self.root / "source"

    @property
    def stats_dir(self) -> HomePath:
        """Shared records: the norm registry, what was published."""
        return self.root / "stats"

    @property
    def machine_stats_dir(self) -> Path:
        """Records of this machine: CPU calibration, canary vectors of the model on this device."""
        return self.local / "stats"

    @property
    def config_file(self) -> Path:
        return self.local / "paper_assets.json"

    @property
    def warehouse(self) -> Path:
        return self.local / "warehouse.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.local / "dagster"

    @property
    def calibration_file(self) -> Path:
        return self.machine_stats_dir / "calibration.json"

    @property
    def celery_config_dir(self) -> Path:
        return self.dagster_home / "celery"

    def canary_file(self, fingerprint: str, precision: str) -> Path:
        return self.machine_stats_dir / f"canary-{fingerprint}-{precision}.npy"

    @property
    def index_dir(self) -> HomePath:
        return self.root / "index"

    @property
    def index_cache(self) -> Path:
        """Local copies of object-storage index builds (FAISS and the memory-mapped vectors need local files)."""
        return self.local / "cache" / "index"

    @property
    def novelty_dir(self) -> HomePath:
        return self.root / "novelty"

    def novelty_file(self, month: str) -> HomePath:
        return self._inside(self.novelty_dir / f"novelty-{month}.parquet")

    @property
    def hub_folder(self) -> Path:
        return self.local / "hub"

    @property
    def demo_dir(self) -> Path:
        return self.local / "demo"

    def papers_file(self, rng: IdRange) -> HomePath:
        return self._inside(self.papers_dir / f"papers-{rng.key}.parquet")

    def embeddings_file(self, rng: IdRange) -> HomePath:
        return self._inside(self.embeddings_dir / f"embeddings-{rng.key}.parquet")

    def gate_file(self, rng: IdRange) -> HomePath:
        """The quality-gate record of a partition's embeddings (what its blocking checks decided)."""
        return self._inside(self.embeddings_dir / f"embeddings-{rng.key}.checks.json")

    def checkpoint_dir(self, rng: IdRange) -> HomePath:
        return self._inside(self.embeddings_dir / ".checkpoints" / rng.key)

    def lock(self, name: str) -> FileLock:
        """A lock between this machine's processes (on object storage, writers on different machines work on
        different partitions; the Dagster run coordinator keeps one run per partition)."""
        return FileLock(self.local / ".locks" / f"{name}.lock")

    def register_filesystem(self, conn) -> None:
        register_home_filesystem(conn, self.root)
