"""How steps execute: in local processes (the default), on Celery workers (``PAPER_ASSETS_CELERY_BROKER``), or
one Kubernetes pod per step (``PAPER_ASSETS_EXECUTOR=k8s``; the embedding steps' pods request a GPU through the
``dagster-k8s/config`` tag, see ``K8S_GPU_STEP``).

With Celery, every step runs inside a long-lived worker process (dagster-celery executes the step in the task body),
so the model that :class:`~paper_assets.defs.resources.Specter2Resource` caches per process is loaded once per
worker and reused by every later partition: a UI backfill of hundreds of partitions loads the model once per
device, not once per partition, while each partition keeps its own run, materialisation, metadata and checks.
Embedding steps go to the ``embed`` queue (workers bound to one device each: ``paper-assets worker --device``),
everything else to Dagster's default ``dagster`` queue.
"""

from __future__ import annotations

from ..settings import Settings

CELERY_QUEUE_TAG = "dagster-celery/queue"  # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG
EMBED_QUEUE = "embed"
GENERAL_QUEUE = "dagster"
K8S_CONFIG_TAG = "dagster-k8s/config"  # dagster_k8s.job.K8S_RESOURCE_REQUIREMENTS_KEY's tag
# What the k8s_job_executor gives an embedding step's pod (other executors ignore the tag): one GPU.
K8S_GPU_STEP = {"container_config": {"resources": {"requests": {"nvidia.com/gpu": "1", "cpu": "4", "memory": "16Gi"},
                                                   "limits": {"nvidia.com/gpu": "1", "memory": "32Gi"}}}}
EXECUTORS = ("auto", "multiprocess", "celery", "k8s")
# dagster-celery's run coordinator polls its steps' results every TICK_SECONDS (1 s), so each hand-off from one step
# to the next waits up to a second: a run of papers + paper_embeddings spent 1.5 s of its 35 s there. A tenth of it
# costs ten result-backend reads a second per step in flight.
COORDINATOR_POLL_SECONDS = 0.1
# Redis redelivers a task that is not acknowledged within this time; it must exceed the longest step.
VISIBILITY_TIMEOUT_SECONDS = 12 * 3600


def celery_config(settings: Settings) -> dict:
    """The executor config block the runs and the workers share (`paper-assets worker` writes it into the
    ``dagster_celery_config`` module that dagster_celery's app imports)."""
    return {
        "broker": settings.celery_broker,
        "backend": settings.celery_backend or settings.celery_broker,
        "include": [],
        "config_source": {
            "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
            "result_backend_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
            "worker_prefetch_multiplier": 1,  # a worker takes one step at a time, never hoards partitions
            # A step is acknowledged when it ends, not when it starts: if its worker dies (kill -9, lost machine)
            # the broker hands it to another worker, which resumes from the chunk checkpoints. RabbitMQ does so as
            # soon as the dead worker's connection drops; Redis after visibility_timeout.
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
        },
    }


def steps_share_a_process(settings: Settings) -> bool:
    """Whether consecutive steps run in one long-lived process (Celery workers), so a model loaded, and compiled, by
    one step serves the next; the multiprocess and k8s executors start a process (or pod) per step."""
    return settings.executor == "celery" or (settings.executor == "auto" and bool(settings.celery_broker))


def executor_for(settings: Settings):
    """``auto``: Celery when a broker is configured, else ``None`` (Dagster's default multiprocess executor)."""
    kind = settings.executor
    if kind not in EXECUTORS:
        raise ValueError(f"PAPER_ASSETS_EXECUTOR must be one of {', '.join(EXECUTORS)}, not {kind!r}")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if kind == "celery" or (kind == "auto" and settings.celery_broker):
        if not settings.celery_broker:
            raise ValueError("PAPER_ASSETS_EXECUTOR=celery needs PAPER_ASSETS_CELERY_BROKER")
        import dagster_celery.core_execution_loop as coordinator_loop
        from dagster_celery import celery_executor

        coordinator_loop.TICK_SECONDS = COORDINATOR_POLL_SECONDS
        return celery_executor.configured(celery_config(settings), name="celery_workers")
    return None
