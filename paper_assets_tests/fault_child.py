"""A child process for the fault-injection tests: materialises one partition (or publishes) and, depending on the
mode, SIGKILLs itself at a precise point: after some checkpoint chunks, in the middle of the final Parquet write,
or between two files of a publish. Killing is done to this process only, the way a crash or OOM killer would.

usage: python -m paper_assets_tests.fault_child MODE SETTINGS_JSON PARTITION_KEY
(mode kill-during-update: the third argument is how many chunk checkpoints an update writes before it dies)
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pyarrow.parquet as pq


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after(obj, name: str, calls: int) -> None:
    original = getattr(obj, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            die()
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)


def main() -> int:
    mode, settings_json, key = sys.argv[1], sys.argv[2], sys.argv[3]
    from dagster import DagsterInstance, materialize

    from paper_assets.definitions import build_definitions
    from paper_assets.defs import embeddings, shards
    from paper_assets.engine import checkpoints
    from paper_assets.settings import Settings

    settings = Settings(**json.loads(settings_json))
    defs = build_definitions(settings)
    resources = dict(defs.resources)
    if os.environ.get("PUBLISH_ENDPOINT"):
        from paper_assets.defs.resources import ShardPublisherResource

        resources["publisher"] = ShardPublisherResource(hub_repo=os.environ["PUBLISH_REPO"],
                                                        endpoint=os.environ["PUBLISH_ENDPOINT"])
    if mode == "kill-during-embedding":
        kill_after(checkpoints.ChunkCheckpoints, "write", 2)
    elif mode == "kill-during-parquet-write":
        kill_after(pq.ParquetWriter, "write_table", 1)
    elif mode == "kill-during-publish":
        from paper_assets.engine import publish_targets

        kill_after(publish_targets, "atomic_path", 1)  # the first shard lands, the process dies before the second
    elif mode == "disk-full":
        def no_space(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

        pq.ParquetWriter.write_table = no_space
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    instance = DagsterInstance.get()
    if mode == "kill-during-update":
        from paper_assets.defs.release import apply_release

        kill_after(checkpoints.ChunkCheckpoints, "write", int(key))
        print(json.dumps(apply_release(defs, instance, publish=True)))
        return 0
    if mode in ("kill-during-publish", "publish"):
        result = materialize([shards.hub_shards], resources=resources, instance=instance, run_config=quiet,
                             raise_on_error=False)
    else:
        result = materialize([embeddings.papers, embeddings.paper_embeddings], partition_key=key,
                             resources=resources, instance=instance, run_config=quiet, raise_on_error=False)
    print(json.dumps({"success": result.success}))
    return 0 if result.success else 3


if __name__ == "__main__":
    sys.exit(main())
