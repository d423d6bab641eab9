"""Imported by the Celery workers `paper-assets worker` starts for the embed queue (Celery's ``imports``): each
worker process loads the model as soon as it starts, so the first step it executes finds it loaded, as every
later step does. The model is the one the steps' ``Specter2Resource`` would load (same settings, same cache key)."""

from __future__ import annotations

import logging
import time

from celery.signals import worker_process_init

log = logging.getLogger(__name__)


@worker_process_init.connect
def load_model_at_start(**_) -> None:
    from ..definitions import build_definitions

    started = time.perf_counter()
    specter2 = build_definitions().resources["specter2"]
    try:
        # expected_rows=0: load only; each step still decides compilation for its own size (Encoder.prepare_for).
        encoder = specter2.get_encoder(expected_rows=0)
    except Exception:  # the first step loads it again and fails with this error in the run's own log
        log.exception("paper-assets: loading the model at worker start failed")
        return
    log.warning("paper-assets: model loaded at worker start (%s, %s) in %.1f s", encoder.loaded.device,
                encoder.loaded.precision, time.perf_counter() - started)
