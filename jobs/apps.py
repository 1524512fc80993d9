import gc

from django.apps import AppConfig

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
    """Once a qcluster process has spawned, hide its long-lived objects
    (Django, the OpenAI SDK, every module) from the cyclic garbage
    collector: each full collection walked all of them, which was 0.9 s of
    CPU in a 5,000-row run of 7.7 s. Short-lived objects are collected as
    before; reference counting frees the rest."""
    from . import tasks  # noqa: F401 (loads the runner and the SDK first)

    gc.collect()
    gc.freeze()
