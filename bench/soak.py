"""Soak (issue 4): a 1,000-row job while the LLM misbehaves (10 % 429s, 5 %
500s, 5 % answers that are not JSON) and its worker is killed with SIGKILL
twice. It must end with done + failed = total, no row's properties stored
twice, and no row that was done sent to the LLM again.

    python bench/soak.py --db postgres [--rows N] [--smoke]
"""

import hashlib
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.measure import Report
from bench.rows import airline_rows, rows_description, start_body

FAULTS = {"rate_429": 0.10, "rate_500": 0.05, "rate_bad_json": 0.05, "retry_after": 0}
# Short leases and backoffs so that a killed worker's rows come back quickly.
SETTINGS = {
    "STRINGSIGHT_LEASE_SECONDS": "4",
    "STRINGSIGHT_RETRY_BASE_SECONDS": "0.05",
    "STRINGSIGHT_RETRY_MAX_SECONDS": "0.5",
}


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--rows", type=int, help="default 1,000 (smoke 40)")
    parser.add_argument("--kills", type=int, default=2)
    return parser


def run(session: harness.Session, args) -> Report:
    from django.db.models import Count

    from jobs.models import ExtractJob, ExtractRow, Property
    from jobs.services import recovery

    total = harness.sized(args, "rows", 1000, 40)
    workers = harness.sized(args, "workers", 2, 1)
    report = Report(f"soak: faults and killed workers ({session.kind})", smoke=args.smoke)
    session.describe(report, workers=workers)
    batch = airline_rows(total)
    report.setting("rows", rows_description(batch, "airline demo"))
    report.setting("faults", ", ".join(f"{name} {value}" for name, value in FAULTS.items()))

    session.fresh_database()
    session.simulate(latency_ms=150, jitter_ms=100, **FAULTS)
    started = time.monotonic()
    kills = []
    with session.web(**SETTINGS) as web:
        api = session.api(web)
        job_id = api.expect(api.start(start_body(batch, max_workers=16)), 201)["job_id"]
        for kill in range(args.kills):
            with session.cluster(workers, **SETTINGS) as cluster:
                wait_for_progress(api, job_id, (kill + 1) * total // (args.kills + 2))
                done_before = set(
                    ExtractRow.objects.filter(job_id=job_id, status="done").values_list("index", flat=True)
                )
                os.killpg(cluster.pid, signal.SIGKILL)
                kills.append((time.time(), time.monotonic() - started, done_before))
        # A new worker recovers the job: the sweep (due now) returns the dead
        # workers' rows once their leases run out and re-enqueues the work.
        recovery.ensure_sweep_schedule()
        with session.cluster(workers, **SETTINGS):
            final = api.wait_finished(job_id, timeout=1800)
    elapsed = time.monotonic() - started

    job = ExtractJob.objects.get(pk=job_id)
    statuses = Counter(ExtractRow.objects.filter(job_id=job_id).values_list("status", flat=True))
    per_row = ExtractRow.objects.filter(job_id=job_id).annotate(stored=Count("properties"))
    mismatched = sum(1 for row in per_row if row.stored and row.status != "done")
    stored = Property.objects.filter(job_id=job_id).count()
    requests = session.simulator.requests()
    resent = 0
    for killed_at, _, done_before in kills:
        later = {r["user_sha256"] for r in requests if r["started_at"] > killed_at}
        rows = ExtractRow.objects.filter(job_id=job_id, index__in=done_before)
        resent += sum(transcript_sha(row.data) in later for row in rows)
    outcomes = Counter(request["outcome"] for request in requests)

    report.figure("final state", final["state"], target="done", ok=final["state"] == "done")
    report.figure(
        "done + failed = total",
        f"{job.count_done} + {job.count_failed} = {job.count_done + job.count_failed} of {job.count_total}",
        target="equal",
        ok=job.count_done + job.count_failed == job.count_total,
    )
    report.figure("rows by status", ", ".join(f"{name} {count}" for name, count in sorted(statuses.items())))
    report.figure(
        "properties stored = properties_count",
        f"{stored:,} = {job.properties_count:,}",
        target="equal",
        ok=stored == job.properties_count,
    )
    report.figure("rows holding properties but not done", mismatched, "{:,}", target="0", ok=mismatched == 0)
    report.figure("done rows sent to the LLM again after a kill", resent, "{:,}", target="0", ok=resent == 0)
    report.figure("kills (seconds into the run)", ", ".join(f"{at:.1f} s" for _, at, _ in kills))
    report.figure(
        "simulator answers by outcome",
        ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items())),
    )
    report.figure("wall time", elapsed, "{:,.1f} s")
    return report


def wait_for_progress(api, job_id: str, finished: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api.expect(api.status(job_id))
        if body["count_done"] + body["count_failed"] >= finished:
            return
        time.sleep(0.2)
    raise RuntimeError(f"job {job_id} did not reach {finished} finished rows")


def transcript_sha(data: dict) -> str:
    from extraction.render import render_row

    return hashlib.sha256(render_row(data, "single_model").encode()).hexdigest()


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
