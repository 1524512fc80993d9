from django.apps import AppConfig

from stringsight_site import perf

# post_spawn's receiver that sweeps in every worker process (jobs.sweeper).
BACKGROUND_SWEEPS = "jobs.background_sweeps"


class JobsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "jobs"

    def ready(self):
        from django_q.signals import post_spawn

        from .sweeper import start_background_sweeps

        post_spawn.connect(settle_worker, dispatch_uid="jobs.settle_worker")
        post_spawn.connect(start_background_sweeps, dispatch_uid=BACKGROUND_SWEEPS)


def settle_worker(**kwargs) -> None:
    """Once a qcluster process has spawned and loaded what it runs on, keep
    those long-lived objects out of the cyclic collector's way
    (perf.freeze_long_lived_objects)."""
    from . import tasks  # noqa: F401 (loads the worker and the SDK first)

    perf.freeze_long_lived_objects()
