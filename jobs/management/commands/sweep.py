from django.core.management.base import BaseCommand

from jobs.services import recovery


class Command(BaseCommand):
    help = (
        "Return rows of dead workers to pending, finish complete jobs and re-enqueue stalled ones "
        "(running workers do this every few seconds)."
    )

    def handle(self, *args, **options):
        recovery.ensure_sweep_schedule()
        self.stdout.write(str(recovery.sweep()))
