"""List, show, cancel and resume extraction jobs from the shell. A job id
may be given as a unique start of it (six hex digits or more)."""

from contextlib import nullcontext

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from jobs.cli import error_message, find_job, quiet_logs, user_named
from jobs.formatting import format_cost, format_duration
from jobs.models import ExtractJob, JobState, RowStatus
from jobs.presenter import detail_payload
from jobs.services import lifecycle
from jobs.services.errors import JobError

FAILED_ROWS_SHOWN = 5
ERROR_CHARS_SHOWN = 200


class Command(BaseCommand):
    help = "List, show, cancel or resume extraction jobs."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True, metavar="{list,show,cancel,resume}")
        listing = actions.add_parser("list", help="jobs newest first")
        listing.add_argument("--state", choices=JobState.values)
        listing.add_argument("--user", help="only this user's jobs")
        listing.add_argument("--limit", type=int, default=20, help="at most this many jobs (default 20)")
        show = actions.add_parser("show", help="a job's detail and its first failed rows")
        show.add_argument("job_id")
        cancel = actions.add_parser("cancel", help="cancel a queued or running job")
        cancel.add_argument("job_id")
        resume = actions.add_parser("resume", help="run a cancelled or failed job's unfinished rows again")
        resume.add_argument("job_id")
        resume.add_argument("--retry-failed", action="store_true", help="run its failed rows again too")

    def handle(self, *args, action, verbosity, **options):
        with quiet_logs() if verbosity < 2 else nullcontext():
            self.run(action, options)

    def run(self, action: str, options: dict) -> None:
        if action == "list":
            self.list_jobs(state=options["state"], username=options["user"], limit=options["limit"])
        elif action == "show":
            self.show(find_job(options["job_id"]))
        elif action == "cancel":
            self.cancel(find_job(options["job_id"]))
        else:
            self.resume(find_job(options["job_id"]), retry_failed=options["retry_failed"])

    def list_jobs(self, *, state: str | None, username: str | None, limit: int) -> None:
        if limit < 1:
            raise CommandError("--limit must be at least 1")
        jobs = ExtractJob.objects.select_related("owner").order_by("-created_at")
        if state:
            jobs = jobs.filter(state=state)
        if username:
            jobs = jobs.filter(owner=user_named(username))
        table = [("ID", "OWNER", "STATE", "DONE/FAILED/TOTAL", "PROPERTIES", "MODEL", "CREATED")]
        table += [
            (
                str(job.id),
                owner_name(job),
                job.state,
                f"{job.count_done}/{job.count_failed}/{job.count_total}",
                str(job.properties_count),
                job.model_name,
                timestamp(job.created_at),
            )
            for job in jobs[:limit]
        ]
        if len(table) == 1:
            self.stdout.write("No jobs.")
            return
        widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))]
        for row in table:
            self.stdout.write(
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            )

    def show(self, job: ExtractJob) -> None:
        detail = detail_payload(job)
        outcomes = detail["outcomes"]
        usage = detail["usage"]
        budget = [f"{name} {value}" for name, value in detail["budget"].items() if value is not None] or [
            "none"
        ]
        lines = [f"Job {job.id}"]
        if job.state == JobState.ERROR and job.error:
            # First and whole: why the job stopped is what its owner needs.
            lines += [
                f"  ERROR: {job.error}",
                f"  Its unfinished rows are kept: `manage.py jobs resume {job.id}` runs them once the cause "
                "is fixed.",
            ]
        lines += [
            f"  state:       {job.state}" + (f" ({detail['error']})" if detail["error"] else ""),
            f"  owner:       {owner_name(job)}",
            f"  method:      {job.method}",
            f"  model:       {job.model_name}",
            f"  mode:        {job.mode}",
            f"  rows:        {job.count_total}: " + ", ".join(f"{n} {name}" for name, n in outcomes.items()),
            f"  progress:    {detail['progress']:.0%}",
            f"  properties:  {job.properties_count}",
            f"  tokens:      {usage['total_tokens']:,} ({usage['prompt_tokens']:,} prompt, "
            f"{usage['completion_tokens']:,} completion)",
            f"  cost:        {format_cost(detail['cost_usd'])}",
            f"  cache hits:  {job.cache_hits}",
            f"  budget:      {', '.join(budget)}",
        ]
        lines += batch_lines(detail)
        if (ahead := detail["queue_position"]) is not None:
            lines.append(f"  queue:       {ahead} queued job{'' if ahead == 1 else 's'} ahead of it")
        if job.state == JobState.RUNNING:
            lines.append(f"  in flight:   {detail['calls_in_flight']} LLM calls")
        if detail["rows_per_second"] is not None:
            eta = detail["eta_seconds"]
            lines.append(
                f"  rate:        {detail['rows_per_second']:.1f} rows/s, "
                f"ETA {format_duration(eta, compact=True) if eta is not None else '—'}"
            )
        for name in ("created_at", "started_at", "finished_at", "cancelled_at"):
            if detail[name] is not None:
                lines.append(f"  {name.removesuffix('_at') + ':':<12} {timestamp(detail[name])}")
        failed = list(
            job.rows.filter(status=RowStatus.FAILED)
            .order_by("index")[:FAILED_ROWS_SHOWN]
            .values_list("index", "question_id", "error")
        )
        if failed:
            lines.append(f"Failed rows (the first {len(failed)} of {job.count_failed}):")
            lines += [
                f"  row {index} ({question_id}): {shorten(error)}" for index, question_id, error in failed
            ]
        self.stdout.write("\n".join(lines))

    def cancel(self, job: ExtractJob) -> None:
        outcome = lifecycle.job_cancel(job=job)
        job = outcome.job
        if outcome.cancelled_now:
            self.stdout.write(f"Cancelled job {job.id}: {job.properties_count} properties kept.")
        elif job.state == JobState.CANCELLED:
            self.stdout.write(f"Job {job.id} was already cancelled: {job.properties_count} properties kept.")
        else:
            self.stdout.write(
                f"Job {job.id} already finished (state: {job.state}): {job.properties_count} properties."
            )

    def resume(self, job: ExtractJob, *, retry_failed: bool) -> None:
        failed_before = job.count_failed
        try:
            job = lifecycle.job_resume(job=job, retry_failed=retry_failed)
        except JobError as exc:
            raise CommandError(f"job {job.id} cannot be resumed: {error_message(exc)}") from None
        reopened = job.count_total - job.count_done - job.count_failed
        retried = f" ({failed_before - job.count_failed} of them failed before)" if retry_failed else ""
        self.stdout.write(
            f"Resumed job {job.id}: {rows(reopened)} reopened{retried}, {rows(job.count_done, 'done')} kept. "
            "It is queued for a worker (python manage.py qcluster)."
        )


def batch_lines(detail: dict) -> list[str]:
    """A batch-mode job's batches at the provider, one a line, and whether
    the provider still holds results for it."""
    lines = []
    for at, batch in enumerate(detail["provider_batches"]):
        counts = batch["request_counts"]
        lines.append(
            f"  {'batches:' if at == 0 else '':<12} {batch['id']} {batch['status'] or '(no status yet)'}: "
            f"{counts['completed']} completed, {counts['failed']} failed of {counts['total']}"
        )
    if detail["pending_provider_results"]:
        lines.append("  pending:     the provider holds results not imported yet; counts may still grow")
    return lines


def rows(count: int, kind: str = "") -> str:
    return f"{count} {kind + ' ' if kind else ''}row{'' if count == 1 else 's'}"


def owner_name(job: ExtractJob) -> str:
    return job.owner.username if job.owner else "(anonymous)"


def timestamp(moment) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S")


def shorten(error: str) -> str:
    line = " ".join(error.split())
    return line if len(line) <= ERROR_CHARS_SHOWN else line[: ERROR_CHARS_SHOWN - 1] + "…"
