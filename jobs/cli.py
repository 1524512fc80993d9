"""What the `extract` and `jobs` commands share: rows read from a file, a
job found by its id or the start of it, a job's properties written to a
file, the inline runner and the progress line."""

import argparse
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.core.management.base import CommandError
from django.db import connection

from . import exports, rowfiles
from .formatting import format_cost, format_duration, job_id_search
from .models import ExtractJob, ExtractRow, JobState, Property, RowStatus
from .services import lifecycle
from .services.errors import InvalidInput, JobError
from .worker.engine import Engine, WorkerSettings

log = logging.getLogger(__name__)

OUTPUT_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
MIN_ID_PREFIX = 6
# The most a count option's column holds (a PositiveIntegerField on PostgreSQL).
MAX_COUNT = 2**31 - 1


def count_option(text: str) -> int:
    """An option's whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected a whole number of at most {MAX_COUNT}, got {value}")
    return value


def error_message(exc: JobError) -> str:
    """A refusal as the API words it: naming its field, if it has one."""
    return exc.detail if isinstance(exc, InvalidInput) else exc.message


def read_rows(path: Path) -> list:
    """The rows of a JSONL, JSON, CSV or Parquet file, as the API would receive them."""
    try:
        kind = rowfiles.input_format(path.name)
    except rowfiles.RowFileError as exc:
        raise CommandError(f"{path}: {exc}") from None
    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    with path.open("rb") as stream:
        try:
            return rowfiles.read_rows(stream, kind)
        except rowfiles.RowFileError as exc:
            raise CommandError(f"{path}: {exc}") from None


def output_format(path: Path) -> str:
    kind = OUTPUT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise CommandError(
            f"{path}: unknown output format {path.suffix or '(no extension)'!r}; use .jsonl, .csv or .parquet"
        )
    if not path.parent.is_dir():
        raise CommandError(f"{path}: the directory {path.parent} does not exist")
    return kind


def write_properties(job: ExtractJob, path: Path) -> int:
    """Write every property of the job to `path` (format by extension) and
    return how many. A partial file is written first and renamed, so an
    interrupted write never leaves a file that looks complete."""
    kind = output_format(path)
    written = 0

    def counted():
        nonlocal written
        properties = Property.objects.filter(job_id=job.pk)
        for record in exports.export_records(properties, kind):
            written += 1
            yield record

    partial = path.with_name(path.name + ".partial")
    try:
        if kind == "parquet":
            with partial.open("wb") as out:
                for chunk in exports.parquet_chunks(counted()):
                    out.write(chunk)
        else:
            with partial.open("w", encoding="utf-8", newline="") as out:
                for chunk in exports.TEXT_WRITERS[kind](counted()):
                    out.write(chunk)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return written


def user_named(name: str | None):
    """The named user; by default the first superuser, else a user `cli`."""
    users = get_user_model().objects
    if name:
        user = users.filter(username=name).first()
        if user is None:
            raise CommandError(f"no user named {name!r}")
        return user
    return (
        users.filter(is_superuser=True).order_by("pk").first()
        or users.get_or_create(username="cli", defaults={"password": make_password(None)})[0]
    )


def find_job(text: str) -> ExtractJob:
    """A job by its id or a unique start of it (at least six hex digits)."""
    lookup = job_id_search(text)
    if lookup is None or len(text.strip().replace("-", "")) < MIN_ID_PREFIX:
        raise CommandError(
            f"{text!r} is not a job id (give the id or at least its first {MIN_ID_PREFIX} digits)"
        )
    matches = list(ExtractJob.objects.select_related("owner").filter(lookup)[:2])
    if not matches:
        raise CommandError(f"no job {text}")
    if len(matches) > 1:
        raise CommandError(f"{text!r} is the start of more than one job id; give more of it")
    return matches[0]


class InlineRunner(threading.Thread):
    """Works on the job in this process until it has no pending rows or
    stops running. Rows are claimed in the database, so a
    worker that picks up the job's queued tasks only helps."""

    def __init__(self, job_id):
        super().__init__(name="inline-runner", daemon=True)
        self.job_id = job_id
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            lifecycle.job_mark_running(job_id=self.job_id)
            config = WorkerSettings.from_django()
            while self._work_left():
                Engine(config, job_id=self.job_id).run()
        except Exception as exc:
            log.exception("job %s: the inline runner crashed", self.job_id)
            self.error = exc
        finally:
            connection.close()  # this thread's own connection

    def _work_left(self) -> bool:
        return (
            lifecycle.job_state(job_id=self.job_id) == JobState.RUNNING
            and ExtractRow.objects.filter(job_id=self.job_id, status=RowStatus.PENDING).exists()
        )


@contextmanager
def ctrl_c_flag():
    """While inside, Ctrl-C (SIGINT) sets the yielded event instead of
    raising KeyboardInterrupt, so it never lands in the middle of a database
    call. Outside the main thread signals cannot be handled; the event then
    stays unset."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def quiet_logs(names=("stringsight.events", "django-q", "jobs")):
    """Keep the job's INFO logs off the terminal that shows the progress line."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _unstyled(text: str) -> str:
    return text


class ProgressLine:
    """A job's progress on one line of stderr, redrawn in place on a
    terminal; elsewhere (a log file, CI) a new line every few seconds."""

    BAR_WIDTH = 24
    LOG_EVERY_SECONDS = 5.0

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.drawn = False
        self.last_logged = -math.inf
        self.last_line = ""

    def show(self, detail: dict, *, final: bool = False) -> None:
        line = progress_text(detail)
        if self.tty:
            self._write(f"\r{line}\x1b[K")
            self.drawn = True
        elif final or time.monotonic() - self.last_logged >= self.LOG_EVERY_SECONDS:
            # Only a line written counts as the last: a final line equal to
            # one shown but held back (between logs) is still written.
            if line != self.last_line:
                self._write(line + "\n")
                self.last_line = line
            self.last_logged = time.monotonic()

    def note(self, text: str) -> None:
        """A message on its own line, leaving the progress line below it."""
        self.end()
        self._write(text + "\n")

    def end(self) -> None:
        if self.drawn:
            self._write("\n")
            self.drawn = False

    def _write(self, text: str) -> None:
        self.out.write(text, style_func=_unstyled, ending="")
        self.out.flush()


def progress_text(detail: dict) -> str:
    total = detail["count_total"]
    finished = detail["count_done"] + detail["count_failed"]
    filled = round(ProgressLine.BAR_WIDTH * finished / total) if total else 0
    bar = "#" * filled + "." * (ProgressLine.BAR_WIDTH - filled)
    rate = detail["rows_per_second"]
    eta = detail["eta_seconds"]
    return (
        f"{detail['state']:<9} [{bar}] {detail['count_done']}/{total} done, {detail['count_failed']} failed"
        f" | {f'{rate:.1f} rows/s' if rate else '— rows/s'}"
        f" | ETA {format_duration(eta, compact=True) if eta is not None else '—'}"
        f" | {detail['usage']['total_tokens']:,} tokens | {format_cost(detail['cost_usd'])}"
    )
