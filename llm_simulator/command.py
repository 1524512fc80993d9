"""The simulator's command line, shared by ``python -m llm_simulator`` and
``manage.py llm_simulator``: the flags, the options they make, and the ready line."""

import argparse
import sys

from llm_simulator.client import READY_PREFIX
from llm_simulator.options import SimulatorOptions
from llm_simulator.server import loopback_host, run


def _models(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser):
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
    parser.add_argument("--models", type=_models, default=defaults.models, help="comma-separated model names")
    parser.add_argument(
        "--max-concurrency", type=int, default=None, help="429 for a request beyond this many in flight"
    )
    parser.add_argument(
        "--rpm", type=int, default=None, help="requests per minute, 429 beyond (OpenAI's headers)"
    )
    parser.add_argument(
        "--tpm", type=int, default=None, help="tokens per minute (prompt/4 + max_tokens), 429 beyond"
    )
    parser.add_argument(
        "--quota-spent",
        action="store_true",
        help="answer 429 insufficient_quota to every chat request (end it at run time: quota_spent false)",
    )
    parser.add_argument("--forbidden", action="store_true", help="answer 403 to every chat request")
    parser.add_argument(
        "--no-structured-output",
        dest="structured_output",
        action="store_false",
        help="answer 400 to response_format, like endpoints without structured outputs",
    )
    parser.add_argument(
        "--no-batch-api",
        dest="batch_api",
        action="store_false",
        help="answer 404 on /v1/files and /v1/batches, like providers without a Batch API",
    )
    parser.add_argument(
        "--batch-lines-per-second",
        type=float,
        default=defaults.batch_lines_per_second,
        help="how fast a batch's lines are answered",
    )
    parser.add_argument(
        "--batch-validating-seconds",
        type=float,
        default=defaults.batch_validating_seconds,
        help="how long a new batch stays validating",
    )
    parser.add_argument(
        "--batch-rate-failed",
        type=float,
        default=defaults.batch_rate_failed,
        help="probability that a batch line fails (a 500 in the error file)",
    )
    parser.add_argument(
        "--batch-expiry-seconds",
        type=float,
        default=defaults.batch_expiry_seconds,
        help="a batch expires this long after its creation (default: 24 h)",
    )
    parser.add_argument(
        "--batch-cancel-seconds",
        type=float,
        default=defaults.batch_cancel_seconds,
        help="how long a batch stays cancelling (its lines go on) before it is cancelled",
    )
    parser.add_argument(
        "--batch-create-delay-seconds",
        type=float,
        default=defaults.batch_create_delay_seconds,
        help="how long POST /v1/batches waits, the batch already created, before answering",
    )


def options_from(arguments: dict) -> SimulatorOptions:
    """The options the parsed flags ask for; a bad value raises ValueError naming it."""
    loopback_host(arguments["host"])
    # Options without a flag (paused) are set at run time through /_sim/config.
    names = SimulatorOptions().as_dict()
    return SimulatorOptions(**{name: arguments[name] for name in names if name in arguments})


def ready_line(host: str, port: int) -> str:
    # Tests read this exact line to learn the port.
    shown = f"[{host}]" if ":" in host else host
    return f"{READY_PREFIX}http://{shown}:{port}/v1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_simulator", description=run.__doc__)
    add_arguments(parser)
    arguments = vars(parser.parse_args(argv))
    try:
        options = options_from(arguments)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run(arguments["host"], arguments["port"], options, ready_callback=_announce)
    except OSError as exc:  # the port is taken, most likely
        print(f"cannot listen on {arguments['host']}:{arguments['port']}: {exc}", file=sys.stderr)
        return 1
    return 0


def _announce(host: str, port: int):
    print(ready_line(host, port), flush=True)
