"""Serve the OpenAI-compatible LLM simulator on loopback until SIGINT or SIGTERM."""

from django.core.management.base import BaseCommand, CommandError

from extraction.simulator import SimulatorOptions, loopback_host, run
from extraction.simulator_client import READY_PREFIX


def _models(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


class Command(BaseCommand):
    help = __doc__
    # It needs neither the database nor the rest of the project to be consistent.
    requires_system_checks = []

    def add_arguments(self, parser):
        defaults = SimulatorOptions()
        parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1, ::1 or localhost")
        parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
        parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
        parser.add_argument("--jitter-ms", type=float, default=defaults.jitter_ms)
        for rate in ("rate-429", "rate-500", "rate-bad-json", "rate-truncated", "rate-refusal"):
            parser.add_argument(f"--{rate}", type=float, default=0.0, help="probability per request")
        parser.add_argument(
            "--rate-bad-json-first",
            type=float,
            default=0.0,
            help="probability that a request's first call (by its user message) answers bad JSON",
        )
        parser.add_argument("--retry-after", type=int, default=defaults.retry_after, help="seconds, on 429")
        parser.add_argument("--seed", type=int, default=defaults.seed)
        parser.add_argument("--api-key", default=None, help="require this bearer token (default: any)")
        parser.add_argument(
            "--models", type=_models, default=defaults.models, help="comma-separated model names"
        )
        parser.add_argument(
            "--no-structured-output",
            dest="structured_output",
            action="store_false",
            help="answer 400 to response_format, like endpoints without structured outputs",
        )

    def handle(self, *args, host, port, **options):
        try:
            loopback_host(host)
            # Options without a flag (paused) are set at run time through /_sim/config.
            simulator_options = SimulatorOptions(
                **{name: options[name] for name in SimulatorOptions().as_dict() if name in options}
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        try:
            run(host, port, simulator_options, ready_callback=self._announce)
        except OSError as exc:  # the port is taken, most likely
            raise CommandError(f"cannot listen on {host}:{port}: {exc}") from exc

    def _announce(self, host: str, port: int):
        # Tests read this exact line to learn the port.
        shown = f"[{host}]" if ":" in host else host
        self.stdout.write(f"{READY_PREFIX}http://{shown}:{port}/v1")
        self.stdout.flush()
