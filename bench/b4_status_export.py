"""#4 status and result: on a running 50,000-row job with 200,000 properties,
the status answers in <= 20 ms (p99) while another process keeps recording
row results, and the full JSONL export streams in <= 3 s with bounded memory.

    python bench/b4_status_export.py --db postgres [--rows N] [--properties N] [--smoke]

Running that job through workers would take long, so the job is started
with the real `lifecycle.job_start`, its properties are written with
bulk_create, and a writer process claims and records the remaining rows
with the real `claims.claim_rows` and `claims.record_row_results`. The
export uses `GET /api/jobs/{id}/properties/?format=jsonl` when it answers
200, else `jobs.exports` in a fresh process (the output says which).
"""

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.api import Api
from bench.measure import Report, percentile, vm_hwm_bytes
from bench.rows import synthetic_rows

TARGET_STATUS_P99_MS = 20
TARGET_EXPORT_SECONDS = 3
# "Bounded": the exporting process grows by a fixed amount, not by the export's size.
TARGET_EXPORT_GROWTH_MB = 64
EXPORT_PATH = "/api/jobs/{job_id}/properties/?format=jsonl"


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--rows", type=int, help="the job's rows (default 50,000; smoke 200)")
    parser.add_argument(
        "--properties", type=int, help="properties stored before polling (200,000; smoke 800)"
    )
    parser.add_argument("--polls", type=int, help="status requests to time (default 2,000; smoke 50)")
    parser.add_argument("--poll-interval", type=float, default=0.01, help="seconds between status requests")
    parser.add_argument(
        "--writer-rate",
        type=float,
        help="rows/s the concurrent writer records (default 500; smoke 50; 0: flat out)",
    )
    parser.add_argument("--role", choices=("writer", "export"), help=argparse.SUPPRESS)
    parser.add_argument("--job-id", help=argparse.SUPPRESS)
    return parser


def property_fields(index: int, position: int) -> dict:
    """About the size of a property the simulator (or a real model) writes."""
    return {
        "property_description": f"Asks for the user ID before changing reservation {index} and reads every "
        f"detail back to the user before acting (behaviour {position}).",
        "category": "Policy compliance",
        "reason": "Agents must authenticate a user before acting on a reservation; skipping it risks "
        "changing someone else's booking.",
        "evidence": [f"Could you give me your user ID, please? (row {index})", "I found reservation HAT136."],
        "behavior_type": "Positive",
        "contains_errors": False,
        "unexpected_behavior": position % 7 == 3,
        "model": "bench-model",
        "question_id": f"syn-{index:06d}",
    }


def seed_job(*, rows: int, properties: int, done_rows: int) -> dict:
    """A running job whose first `done_rows` rows are done, holding
    `properties` properties between them."""
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from jobs.models import ExtractJob, ExtractRow, Property, RowStatus
    from jobs.services import lifecycle
    from jobs.services.params import JobParams

    owner = get_user_model().objects.get(username="bench")
    params = JobParams(
        method="single_model",
        system_prompt="default",
        resolved_system_prompt="You extract behavioural properties.",
        task_description="",
        model_name="gpt-4o-mini",
        temperature=0.6,
        top_p=0.95,
        max_tokens=2048,
        max_workers=64,
    )
    started = time.perf_counter()
    job = lifecycle.job_start(owner=owner, rows=synthetic_rows(rows), params=params)
    start_seconds = time.perf_counter() - started
    lifecycle.job_mark_running(job_id=job.id)

    per_row, extra = divmod(properties, done_rows)
    started = time.perf_counter()
    with transaction.atomic():
        batch = []
        done = ExtractRow.objects.filter(job=job, index__lt=done_rows)
        for row_id, index in done.values_list("id", "index"):
            batch += [
                Property(job=job, row_id=row_id, row_index=index, position=p, **property_fields(index, p))
                for p in range(per_row + (index < extra))
            ]
            if len(batch) >= 5000:
                Property.objects.bulk_create(batch)
                batch = []
        Property.objects.bulk_create(batch)
        done.update(status=RowStatus.DONE, finished_at=timezone.now())
        ExtractJob.objects.filter(pk=job.pk).update(count_done=done_rows, properties_count=properties)
    return {
        "job_id": str(job.id),
        "start_seconds": start_seconds,
        "fill_seconds": time.perf_counter() - started,
    }


def rows_to_write(*, rows: int, rate: float, polls: int, interval: float) -> int:
    """Enough rows left for the writer to keep writing through every poll
    (each takes a few ms besides the interval), with room to spare."""
    if not rate:
        return rows // 2
    return min(rows - 1, max(rows // 5, math.ceil(rate * polls * (interval + 0.005) * 1.5)))


def write_results(job_id: str, rate: float) -> dict:
    """The writer process: claim rows and record a result for each, at
    `rate` rows/s, until the job stops running or SIGTERM arrives. It leaves
    the job's last row alone, so the job runs until the benchmark cancels it."""
    from extraction.extract import RowOutcome
    from jobs.models import ExtractJob
    from jobs.services import claims

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    worker_id = f"bench-writer:{os.getpid()}"
    interval = 1 / rate if rate else 0.0
    recorded, started = 0, time.monotonic()
    next_at = started
    last_index = ExtractJob.objects.get(pk=job_id).count_total - 1
    while not stopping:
        claim = claims.claim_rows(job_id=job_id, worker_id=worker_id, limit=64)
        if not claim.job_running or not claim.rows:
            break
        for row in claim.rows:
            if row.index == last_index:
                continue
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
            properties = [property_fields(row.index, p) for p in range(4)]
            outcome = RowOutcome(
                properties=properties,
                raw_answer=json.dumps({"properties": properties}),
                prompt_tokens=400,
                completion_tokens=500,
                attempts=1,
            )
            recorded_now = claims.record_row_results(
                job_id=job_id, worker_id=worker_id, results=[(row, outcome)]
            )
            if not recorded_now.stored:
                stopping.append(True)
                break
            recorded += 1
            if recorded == 1:
                print("writing", flush=True)
            if stopping:
                break
    return {"recorded": recorded, "rows_per_second": recorded / (time.monotonic() - started)}


def export_in_process(job_id: str) -> dict:
    """The JSONL export through `jobs.exports`, in this fresh process, so
    its peak memory is the export's own."""
    import psutil

    from jobs import exports
    from jobs.models import Property

    Property.objects.filter(job_id=job_id).exists()  # connect before taking the baseline
    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    size = lines = 0
    records = exports.export_records(Property.objects.filter(job_id=job_id), "jsonl")
    for chunk in exports.TEXT_WRITERS["jsonl"](records):
        data = chunk.encode()
        size += len(data)
        lines += data.count(b"\n")
    return {
        "seconds": time.perf_counter() - started,
        "bytes": size,
        "lines": lines,
        "growth": vm_hwm_bytes(os.getpid()) - rss_before,
    }


def child(args) -> int:
    harness.setup_django(dict(os.environ))
    result = (
        write_results(args.job_id, args.writer_rate)
        if args.role == "writer"
        else export_in_process(args.job_id)
    )
    print(json.dumps(result), flush=True)
    return 0


def child_process(session: harness.Session, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *arguments],
        cwd=harness.ROOT,
        env=session.env(),
        stdout=subprocess.PIPE,
        text=True,
    )


def poll_status(api: Api, job_id: str, *, polls: int, interval: float) -> tuple[list[float], list[int]]:
    latencies, done = [], []
    for _ in range(polls):
        response = api.status(job_id)
        body = api.expect(response)
        latencies.append(response.seconds * 1000)
        done.append(body["count_done"])
        time.sleep(interval)
    return latencies, done


def export(session: harness.Session, api: Api, sampler, job_id: str) -> dict:
    window = sampler.open_window()
    streamed = api.stream(EXPORT_PATH.format(job_id=job_id))
    sampler.close_window(window)
    if streamed["status"] == 200:
        return {**streamed, "path": f"HTTP {EXPORT_PATH}", "growth": window.rss_growth_of("web")}
    process = child_process(session, "--role", "export", "--job-id", job_id)
    out, _ = process.communicate()
    result = json.loads(out.splitlines()[-1])
    reason = f"the endpoint answered {streamed['status']}"
    return {**result, "path": f"in-process jobs.exports JSONL writer in a fresh process ({reason})"}


@contextlib.contextmanager
def writing(session: harness.Session, job_id: str, rate: float):
    """The writer process, once its first result is in; killed if the benchmark fails."""
    writer = child_process(session, "--role", "writer", "--job-id", job_id, "--writer-rate", str(rate))
    try:
        if writer.stdout.readline().strip() != "writing":
            raise RuntimeError("the writer process failed before recording a row")
        yield writer
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()


def run(session: harness.Session, args) -> Report:
    from django.db import connections

    rows = harness.sized(args, "rows", 50_000, 200)
    properties = harness.sized(args, "properties", 200_000, 800)
    polls = harness.sized(args, "polls", 2000, 50)
    rate = harness.sized(args, "writer_rate", 500.0, 50.0)
    to_write = rows_to_write(rows=rows, rate=rate, polls=polls, interval=args.poll_interval)
    report = Report(f"#4 status and export ({session.kind})", smoke=args.smoke)
    session.describe(report)
    report.setting("qcluster", "none; a writer process records results as a worker would")
    report.setting(
        "job",
        f"{rows:,} synthetic rows (~1 KB), state running, {rows - to_write:,} rows done with "
        f"{properties:,} properties; a writer process records the other rows (4 properties each) "
        f"at {rate:g} rows/s (0: flat out) while {polls:,} status requests are timed "
        f"{args.poll_interval * 1000:g} ms apart",
    )

    session.fresh_database()
    seeded = seed_job(rows=rows, properties=properties, done_rows=rows - to_write)
    connections.close_all()
    job_id = seeded["job_id"]
    with (
        session.web() as web,
        session.sampler(web=web, simulator=False) as sampler,
        writing(session, job_id, rate) as writer,
    ):
        api = session.api(web)
        window = sampler.open_window()
        latencies, done = poll_status(api, job_id, polls=polls, interval=args.poll_interval)
        sampler.close_window(window)
        cancel = api.cancel(job_id)
        api.expect(cancel)
        writer.send_signal(signal.SIGTERM)
        written = json.loads(writer.communicate()[0].splitlines()[-1])
        exported = export(session, api, sampler, job_id)

    p99 = percentile(latencies, 99)
    report.figure("seeding: job_start of the rows (in process)", seeded["start_seconds"], "{:,.2f} s")
    report.figure("seeding: bulk_create of the properties", seeded["fill_seconds"], "{:,.2f} s")
    report.figure(
        "status ms p50 / p95 / p99 / max",
        " / ".join(f"{percentile(latencies, p):,.1f}" for p in (50, 95, 99, 100)),
    )
    report.figure("status ms p99", p99, target=f"<= {TARGET_STATUS_P99_MS}", ok=p99 <= TARGET_STATUS_P99_MS)
    report.figure("rows recorded while polling (count_done climbed)", done[-1] - done[0], "{:,}")
    still = done[-1] > done[len(done) * 9 // 10]
    report.figure("writer still writing during the last 10% of polls", "yes" if still else "NO")
    report.figure("writer rows/s achieved", written["rows_per_second"])
    report.figure("web CPU busy while polling", window.busy("web"), "{:.0%}")
    report.figure(f"cancel of the running {rows:,}-row job", cancel.seconds * 1000, "{:,.1f} ms")
    report.figure("export path", exported["path"])
    report.figure("export size", f"{exported['lines']:,} lines, {exported['bytes'] / 2**20:,.1f} MiB")
    if exported.get("first_byte_seconds") is not None:
        report.figure("export first byte", exported["first_byte_seconds"] * 1000, "{:,.0f} ms")
    report.figure("export seconds (to last byte)", exported["seconds"], "{:,.2f}")
    # The writer's results add properties while the status is polled, so the
    # job ends with more than it was seeded with; the target is for its
    # 200,000 (or --properties), at the rate this export ran.
    per_target = exported["seconds"] * properties / max(1, exported["lines"])
    report.figure(
        f"export seconds for {properties:,} properties (at this export's rate)",
        per_target,
        "{:,.2f}",
        target=f"<= {TARGET_EXPORT_SECONDS}",
        ok=per_target <= TARGET_EXPORT_SECONDS,
    )
    growth_mb = exported["growth"] / 2**20
    report.figure(
        "exporting process RSS growth, MiB",
        growth_mb,
        target=f"<= {TARGET_EXPORT_GROWTH_MB} (bounded)",
        ok=growth_mb <= TARGET_EXPORT_GROWTH_MB,
    )
    return report


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    if arguments.role:
        sys.exit(child(arguments))
    sys.exit(harness.main(run, build_parser()))
