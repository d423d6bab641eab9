"""`paper-assets worker`: a Celery worker bound to one device that executes Dagster steps."""

from __future__ import annotations

import os
import sys

from ..engine.home import ProjectHome
from ..settings import load_settings, variable
from .common import CommandError


def register(sub) -> None:
    worker = sub.add_parser("worker", help="a Celery worker bound to one device that executes Dagster steps and "
                            "keeps the model loaded between them (needs PAPER_ASSETS_CELERY_BROKER)")
    worker.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default auto)")
    worker.add_argument("--queue", action="append", help="queue to serve, repeatable (default: embed and dagster; "
                        "GPU machines: --queue embed)")
    worker.add_argument("--concurrency", type=int, default=1, help="steps at once (default 1: one per device)")
    worker.add_argument("--name", help="Celery node name (default paper-assets-<device>-<pid>@<host>)")
    worker.add_argument("--no-preload", dest="preload", action="store_false",
                        help="do not load the model when the worker starts (by default a worker serving the embed "
                        "queue loads it at start, so its first step does not wait for it)")
    worker.set_defaults(func=run)


def run(args) -> int:
    import socket

    from ..defs.executor import EMBED_QUEUE, GENERAL_QUEUE, celery_config
    from ..engine.device import resolve_device

    settings = load_settings()
    if not settings.celery_broker:
        raise CommandError("paper-assets worker needs a Celery broker: set PAPER_ASSETS_CELERY_BROKER (e.g. "
                           "redis://host:6379/0) here and wherever runs are launched")
    if args.concurrency < 1:
        raise CommandError(f"--concurrency must be at least 1, got {args.concurrency}")
    device = str(resolve_device(args.device))  # fails now, not in the first step, if the device is absent
    queues = args.queue or [EMBED_QUEUE, GENERAL_QUEUE]
    # The steps this worker executes load the code location in its processes: they read the device from here.
    os.environ[variable("device")] = device
    from ..instance import migrate_instance

    migrate_instance(settings)
    config_dir = ProjectHome(settings.home).celery_config_dir
    config_dir.mkdir(parents=True, exist_ok=True)
    config = celery_config(settings)
    module = [f"broker_url = {config['broker']!r}\n", f"result_backend = {config['backend']!r}\n"]
    module += [f"{key} = {value!r}\n" for key, value in config["config_source"].items()]
    if args.preload and EMBED_QUEUE in queues:
        # Celery gives a new worker process 4 s to start by default; loading SPECTER2 on a GPU takes longer.
        module += ["imports = ('paper_assets.defs.worker_preload',)\n", "worker_proc_alive_timeout = 600\n"]
    (config_dir / "dagster_celery_config.py").write_text("".join(module), encoding="utf-8")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(config_dir), os.environ.get("PYTHONPATH")]))
    name = args.name or f"paper-assets-{device.replace(':', '')}-{os.getpid()}@{socket.gethostname()}"
    argv = [sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker", "--loglevel", "INFO",
            "-Q", ",".join(queues), "-n", name, "--pool", "prefork", "-c", str(args.concurrency)]
    print(f"worker {name} on {device}, queues {','.join(queues)}, DAGSTER_HOME={os.environ['DAGSTER_HOME']}",
          flush=True)
    os.execv(argv[0], argv)
    return 0
