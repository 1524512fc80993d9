"""Sweeps from the background of every qcluster worker process.

django-q2 runs schedules at most once a minute, from a scheduler that only
looks now and then, so a schedule alone would leave a dead worker's rows
idle long after their lease ran out (#8 in BENCHMARKS.md asks for progress
soon after a kill). Instead each worker process offers to sweep twice per
STRINGSIGHT_SWEEP_SECONDS, on a thread of its own (idle or busy with a
task), and the database lets one offer through per interval
(recovery.sweep_if_due). The same thread polls the provider's batches of
batch-mode jobs every STRINGSIGHT_BATCH_POLL_SECONDS (batchmode.poll), the
database letting one process through per interval in the same way.
"""

import logging
import random
import threading

from django.conf import settings
from django.db import connection

from .services import recovery

log = logging.getLogger(__name__)


def start_background_sweeps(**kwargs) -> threading.Thread:
    """Connected to django-q2's post_spawn, sent in each new worker process."""
    thread = threading.Thread(target=sweep_until, name="stringsight-sweeps", daemon=True)
    thread.start()
    return thread


def sweep_until(stop: threading.Event | None = None) -> None:
    """Offer to sweep every half interval until `stop` is set (in a worker
    process: until it exits)."""
    # Here, not at the top: every process loads this module (the app's
    # ready), and only a worker's needs the batch mode's SDK client.
    from .batchmode import poll

    stop = stop or threading.Event()
    interval = min(settings.STRINGSIGHT_SWEEP_SECONDS, settings.STRINGSIGHT_BATCH_POLL_SECONDS) / 2
    # Spread the offers of processes that started together.
    waited = stop.wait(random.uniform(0, interval))
    while not waited:
        for offer, what in ((recovery.sweep_if_due, "sweep"), (poll.poll_if_due, "batch poll")):
            try:
                offer()
            except Exception:
                # The database (or the provider) may be away for a while; the offers go on.
                log.exception("background %s failed", what)
                connection.close()  # a fresh connection next time
        waited = stop.wait(interval)
    connection.close()
