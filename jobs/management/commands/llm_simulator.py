"""Serve the OpenAI-compatible LLM simulator on loopback until SIGINT or SIGTERM."""

from django.core.management.base import BaseCommand, CommandError

from llm_simulator.command import add_arguments, options_from, ready_line
from llm_simulator.server import run


class Command(BaseCommand):
    help = __doc__
    # It needs neither the database nor the rest of the project to be consistent.
    requires_system_checks = []

    def add_arguments(self, parser):
        add_arguments(parser)

    def handle(self, *args, host, port, **options):
        try:
            simulator_options = options_from({"host": host, **options})
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        try:
            run(host, port, simulator_options, ready_callback=self._announce)
        except OSError as exc:  # the port is taken, most likely
            raise CommandError(f"cannot listen on {host}:{port}: {exc}") from exc

    def _announce(self, host: str, port: int):
        self.stdout.write(ready_line(host, port))
        self.stdout.flush()
