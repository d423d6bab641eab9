"""Folders of several files (a snapshot, an index build) written under a new name and made current by switching a
small ``current.json`` pointer, on a local disk as on object storage; older versions pruned."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .fs import HomePath, atomic_path, is_local, read_record, remove_tree

CURRENT_FILE = "current.json"


def switch_current(root: HomePath, field: str, name: str) -> None:
    """Point ``root/current.json`` at the complete version folder ``root/name`` (atomically; readers see the old
    pointer or the new one)."""
    with atomic_path(root / CURRENT_FILE) as tmp:
        tmp.write_text(json.dumps({field: name}), encoding="utf-8")


def current_name(root: HomePath, field: str) -> str | None:
    """The version folder ``root/current.json`` points at, or None before the first switch (or when that folder
    has lost its manifest: a reader then sees no version rather than a broken one)."""
    with contextlib.suppress(FileNotFoundError):
        name = json.loads(read_record(root / CURRENT_FILE))[field]
        if (root / name / "manifest.json").exists():
            return name
    return None


def prune_versions(root: HomePath, keep_newest: int, keep: set[str]) -> None:
    """Remove complete version folders (those with a ``manifest.json``) beyond the newest ``keep_newest`` by
    manifest time, never one named in ``keep``."""
    versions = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and (p / "manifest.json").exists()),
                      key=lambda p: (p / "manifest.json").stat().st_mtime, reverse=True)
    for old in versions[keep_newest:]:
        if old.name not in keep:
            remove_tree(old)


@contextlib.contextmanager
def staged_version(root: HomePath, name: str) -> Iterator[Path]:
    """A local folder to write version ``name`` into; on success it becomes ``root/name`` whole (``manifest.json``
    last, so :func:`current_name` never accepts a version with files still missing), else it is discarded."""
    if is_local(root):
        staging = root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield staging
            shutil.rmtree(root / name, ignore_errors=True)
            staging.rename(root / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix=f"paper_assets-{name}-") as scratch:
        yield Path(scratch)
        final = root / name
        # Written over, not removed first: a version's name stands for its content (a release id, an index build
        # hash), so readers of the current version keep a complete one throughout.
        files = sorted((p for p in Path(scratch).rglob("*") if p.is_file()), key=lambda p: p.name == "manifest.json")
        for file in files:
            target = final / file.relative_to(scratch).as_posix()
            final.fs.put_file(str(file), target.path)


def local_version(folder: HomePath, cache: Path | None) -> Path:
    """A local copy of the version folder ``folder`` (itself when local): readers that memory-map or hand paths to
    native libraries need one. Version folders are named by content, so a cached copy stays valid; its
    ``manifest.json`` is fetched again each time (it records what the version was last confirmed against)."""
    if is_local(folder):
        return folder
    local = cache / folder.name
    if not (local / "manifest.json").exists():
        partial = cache / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        folder.fs.get(folder.path.rstrip("/") + "/", str(partial), recursive=True)
        shutil.rmtree(local, ignore_errors=True)
        partial.rename(local)
    else:
        with atomic_path(local / "manifest.json") as tmp:
            folder.fs.get_file((folder / "manifest.json").path, str(tmp))
    return local
