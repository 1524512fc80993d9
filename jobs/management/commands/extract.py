"""Extract properties from a file of rows and write them to a file, with a
live progress line. Ctrl-C cancels the job and still writes what was
extracted before it."""

import time
from contextlib import nullcontext
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from jobs.cli import (
    InlineRunner,
    ProgressLine,
    count_option,
    ctrl_c_flag,
    error_message,
    output_format,
    quiet_logs,
    read_rows,
    user_named,
    write_properties,
)
from jobs.formatting import format_cost, format_duration
from jobs.models import ExtractJob, JobMode, JobState
from jobs.presenter import detail_payload
from jobs.services import estimates, lifecycle, options
from jobs.services.errors import JobError

QUEUED_HINT_SECONDS = 10.0
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report it
NO_WORKER_HINT = (
    f"The job is still queued after {QUEUED_HINT_SECONDS:.0f} s: no worker seems to be running. "
    "Start one with `python manage.py qcluster`, or run this command with --inline."
)
# Options that go to the start request as they are, by their API names.
START_OPTIONS = {
    "method": "method",
    "model": "model_name",
    "system_prompt": "system_prompt",
    "task_description": "task_description",
    "sample_size": "sample_size",
    "max_workers": "max_workers",
    "mode": "mode",
}


class Command(BaseCommand):
    help = (
        "Extract properties from a JSONL, JSON, CSV or Parquet file of rows and write them to "
        "OUTPUT (.jsonl, .csv or .parquet). Ctrl-C cancels the job and keeps what was extracted."
    )

    def add_arguments(self, parser):
        parser.add_argument("input", help="rows: .jsonl, .json (a list or {'rows': [...]}), .csv or .parquet")
        parser.add_argument("--method", help="single_model or side_by_side (detected from the columns)")
        parser.add_argument("--model", help="the LLM to ask (default: STRINGSIGHT_DEFAULT_MODEL)")
        parser.add_argument("--system-prompt", help="a prompt name (default, agent) or literal prompt text")
        parser.add_argument("--task-description")
        parser.add_argument("--sample-size", type=count_option, help="run a seeded sample of this many rows")
        parser.add_argument("--max-workers", type=count_option, help="concurrent LLM calls (default 16)")
        parser.add_argument(
            "--mode",
            choices=JobMode.values,
            help="online (live calls, the default) or batch (the provider's Batch API at half the price, "
            "results within 24 h; run by a qcluster, not --inline)",
        )
        parser.add_argument(
            "--out", metavar="OUTPUT", help="default: <input stem>.properties.jsonl next to the input"
        )
        parser.add_argument("--user", help="the job's owner (default: the first superuser, else 'cli')")
        parser.add_argument(
            "--inline", action="store_true", help="run the job in this process instead of on a qcluster"
        )
        parser.add_argument(
            "--estimate",
            action="store_true",
            help="print what the job would cost (tokens, USD, duration) and exit, without starting it",
        )
        parser.add_argument(
            "--poll",
            type=float,
            default=0.5,
            metavar="SECONDS",
            help="seconds between progress updates (default 0.5)",
        )

    def handle(self, *args, verbosity, **options):
        # -v 2 shows the job's event log lines as well.
        with quiet_logs() if verbosity < 2 else nullcontext():
            self.extract(**options)

    def extract(self, *, input, out, user, inline, poll, estimate, **options):
        source = Path(input)
        if estimate:
            accepted = accepted_start(source, options)
            self.stdout.write(
                estimate_text(
                    estimates.job_estimate(
                        rows=accepted.rows, params=accepted.params, encoded_rows=accepted.encoded_rows
                    )
                )
            )
            return
        if inline and options["mode"] == JobMode.BATCH:
            # The inline runner makes live calls; a batch is polled by the workers' sweeper.
            raise CommandError("--inline runs online jobs only; a batch-mode job is run by a qcluster")
        output = Path(out) if out else source.with_name(f"{source.stem}.properties.jsonl")
        output_format(output)  # a bad output path fails before any work is done
        job = start_job(source, user, options)
        self.stdout.write(
            f"Job {job.id}: {job.count_total} rows ({job.method}, model {job.model_name}"
            f"{', batch mode' if job.mode == JobMode.BATCH else ''}), "
            f"{'running here' if inline else 'queued for a worker'}"
        )

        runner = InlineRunner(job.id) if inline else None
        if runner:
            runner.start()
        with ctrl_c_flag() as interrupted:
            self.wait(job, runner, interrupted, poll=max(poll, 0.05))
            if interrupted.is_set():
                # Still under the flag handler: a second Ctrl-C cannot undo the cancel.
                self.announce_cancel(lifecycle.job_cancel(job=job))
        if runner and runner.error and not interrupted.is_set():
            raise CommandError(
                f"the inline runner failed ({runner.error!r}); job {job.id} is still {job.state}: "
                f"a worker (python manage.py qcluster) can finish it, or cancel it with "
                f"python manage.py jobs cancel {job.id}"
            )
        try:
            if runner:
                # It sees a cancel within its poll interval and aborts its calls.
                runner.join(timeout=30)
            written = write_properties(job, output)
        except KeyboardInterrupt:
            self.stderr.write(f"Interrupted again: {output} was not written.")
            raise SystemExit(INTERRUPTED_EXIT_CODE) from None
        self.finish(job, written, output, interrupted=interrupted.is_set())

    def wait(self, job: ExtractJob, runner: InlineRunner | None, interrupted, *, poll: float) -> None:
        """Show progress until the job ends or Ctrl-C is pressed."""
        progress = ProgressLine(self.stderr)
        started = time.monotonic()
        hinted = False
        try:
            while not interrupted.is_set():
                job.refresh_from_db()
                ended = self.ended(job, runner)
                progress.show(detail_payload(job), final=ended)
                if ended:
                    return
                waited = time.monotonic() - started
                if not (runner or hinted) and job.state == JobState.QUEUED and waited > QUEUED_HINT_SECONDS:
                    hinted = True
                    progress.note(NO_WORKER_HINT)
                # Short sleeps, so that a Ctrl-C is acted on at once.
                deadline = time.monotonic() + poll
                while not interrupted.is_set() and time.monotonic() < deadline:
                    time.sleep(0.02)
        finally:
            progress.end()

    @staticmethod
    def ended(job: ExtractJob, runner: InlineRunner | None) -> bool:
        if runner is None:
            return not job.is_active
        # A worker may hold some of the job's rows when the runner is done.
        return not runner.is_alive() and (runner.error is not None or not job.is_active)

    def announce_cancel(self, outcome: lifecycle.CancelOutcome) -> None:
        if outcome.cancelled_now:
            self.stderr.write(
                f"Ctrl-C: cancelled job {outcome.job.id}; {outcome.job.properties_count} properties are "
                "kept. Writing them (Ctrl-C again to abort)."
            )

    def finish(self, job: ExtractJob, written: int, output: Path, *, interrupted: bool) -> None:
        job.refresh_from_db()
        self.stdout.write(summary(job, written, output))
        if interrupted:
            self.stdout.write(f"Interrupted: kept {written} properties in {output}")
            raise SystemExit(INTERRUPTED_EXIT_CODE)
        if job.state == JobState.ERROR:
            raise CommandError(f"job {job.id} failed: {job.error}")
        if job.state == JobState.CANCELLED:
            raise CommandError(f"job {job.id} was cancelled elsewhere (the API, the admin or `jobs cancel`)")


def accepted_start(source: Path, given: dict) -> options.AcceptedStart:
    """The file's rows and the options, accepted by the rules the API starts a job by."""
    request = options.StartRequest(
        rows=read_rows(source),
        **{field: given[option] for option, field in START_OPTIONS.items() if given[option] is not None},
    )
    try:
        return options.accept_start(request)
    except JobError as exc:
        raise CommandError(error_message(exc)) from None


def start_job(source: Path, username: str | None, given: dict) -> ExtractJob:
    """Start a job of the file's rows by the rules the API starts one by."""
    accepted = accepted_start(source, given)
    try:
        return lifecycle.job_start(
            owner=user_named(username),
            rows=accepted.rows,
            params=accepted.params,
            encoded_rows=accepted.encoded_rows,
        )
    except JobError as exc:
        raise CommandError(error_message(exc)) from None


def cost_range(cost: dict) -> str:
    if cost["high"] is None:
        return "unknown (no price for the model: STRINGSIGHT_PRICES)"
    return (
        f"{format_cost(cost['low'])} to {format_cost(cost['high'])}, expected {format_cost(cost['expected'])}"
    )


def estimate_text(estimate: dict) -> str:
    completion = estimate["completion_tokens"]
    expected = completion["expected"]
    seconds = estimate["duration_s"]["expected"]
    mode = estimate["mode"]
    other = next(name for name in estimate["cost_usd_by_mode"] if name != mode)
    if mode == JobMode.BATCH:
        duration = "within the provider's 24 h batch window"
    elif seconds is None:
        duration = "— (no recent calls of the model to go by)"
    else:
        duration = format_duration(seconds)
    return "\n".join(
        [
            f"Estimate (no job started, no LLM call made): {estimate['rows']} rows",
            f"  calls:              {estimate['calls']} "
            f"({estimate['cached_rows']} rows answered from the cache)",
            f"  prompt tokens:      {estimate['prompt_tokens']:,}",
            f"  completion tokens:  expected {'—' if expected is None else f'{expected:,}'}, "
            f"at most {completion['max']:,}",
            f"  cost:               {cost_range(estimate['cost_usd'])} ({mode} mode)",
            f"  {f'in {other} mode:':<20}{cost_range(estimate['cost_usd_by_mode'][other])}",
            f"  duration:           {duration}",
        ]
    )


def summary(job: ExtractJob, written: int, output: Path) -> str:
    return "\n".join(
        [
            f"Job {job.id}: {job.state}",
            f"  rows:        {job.count_done} done, {job.count_failed} failed of {job.count_total}",
            f"  properties:  {written}",
            f"  tokens:      {job.total_tokens:,}",
            f"  cost:        {format_cost(job.cost_usd)}",
            f"  output:      {output}",
        ]
    )
