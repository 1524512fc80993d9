"""#13 batch mode: 5,000 rows sent through the provider's Batch API against
the same rows online, on the same simulator. Targets: the same properties;
the batch job costs 0.50 of the online one; the workers' CPU per row is no
more than online's. Then a batch job cancelled mid-batch: the cancel
answers within 100 ms, `cancelled`, and no line the provider completed is
lost (every one is imported once the provider hands the batch back).

    python bench/b13_batch.py --db postgres [--rows N] [--workers N] [--smoke]

The worker CPU of the batch job covers its whole life: the submission
(render, cache, upload), the polls and the import. Both jobs run with
use_cache false, so neither is answered from the other's answers.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.api import job_figures, run_job, wait_for
from bench.measure import Report
from bench.rows import airline_rows, rows_description, start_body

TARGET_COST_RATIO = 0.50
TARGET_CANCEL_MS = 100
POLL_SECONDS = "1"


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--rows", type=int, help="default 5,000 (smoke 24)")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="the online calls' simulated latency")
    parser.add_argument("--max-workers", type=int, help="the online job's concurrency (default 64, smoke 8)")
    parser.add_argument(
        "--lines-per-second", type=float, help="the simulator's batch speed in the cancel trial (50; smoke 4)"
    )
    return parser


def job_record(job_id: str):
    from jobs.models import ExtractJob

    return ExtractJob.objects.get(pk=job_id)


def properties_of(job_id: str) -> list[tuple]:
    from jobs.models import PROPERTY_CONTENT, Property

    return list(
        Property.objects.filter(job_id=job_id)
        .order_by("row_index", "position")
        .values_list("row_index", "position", *PROPERTY_CONTENT)
    )


def compare(
    session: harness.Session,
    report: Report,
    rows: list[dict],
    *,
    workers: int,
    max_workers: int,
    latency_ms: float,
):
    session.simulate(latency_ms=latency_ms)
    with (
        session.web_and_cluster(workers, STRINGSIGHT_BATCH_POLL_SECONDS=POLL_SECONDS) as (web, cluster),
        session.sampler(web=web, cluster=cluster) as sampler,
    ):
        api = session.api(web)
        online = run_job(api, sampler, start_body(rows, max_workers=max_workers, use_cache=False))
        live_calls = session.simulator.stats()["requests_total"]
        batch = run_job(api, sampler, start_body(rows, mode="batch", use_cache=False), poll_interval=0.5)
    online_job, batch_job = job_record(online.final["job_id"]), job_record(batch.final["job_id"])

    same = properties_of(online_job.pk) == properties_of(batch_job.pk)
    report.figure(
        "properties online / batch",
        f"{online_job.properties_count:,} / {batch_job.properties_count:,}",
    )
    report.figure("same properties, row by row", "yes" if same else "no", "{}", target="yes", ok=same)
    ratio = batch_job.cost_usd / online_job.cost_usd
    report.figure("cost USD online / batch", f"{online_job.cost_usd:,.4f} / {batch_job.cost_usd:,.4f}")
    report.figure(
        "cost ratio batch / online",
        ratio,
        "{:.3f}",
        target=f"{TARGET_COST_RATIO:.2f}",
        ok=abs(ratio - TARGET_COST_RATIO) < 1e-6,
    )
    report.figure(
        "live LLM calls made by the batch job",
        session.simulator.stats()["requests_total"] - live_calls,
        "{:,}",
        target="0",
    )
    online_cpu = online.window.cpu_ms_per("worker", online.finished_rows)
    batch_cpu = batch.window.cpu_ms_per("worker", batch.finished_rows)
    report.figure("worker CPU ms/row online", online_cpu, "{:,.2f}")
    report.figure(
        "worker CPU ms/row batch",
        batch_cpu,
        "{:,.2f}",
        target=f"<= {online_cpu:,.2f}",
        ok=batch_cpu <= online_cpu,
    )
    report.figure("batch job: running (started_at → finished_at)", batch.running_seconds, "{:,.2f} s")
    job_figures(report, online)


def cancel_trial(session: harness.Session, report: Report, rows: list[dict], *, workers: int, speed: float):
    from jobs.batchmode.records import pending_provider_results
    from jobs.models import ExtractRow, ProviderBatch, RowStatus

    # The cancel takes a second to take effect at the provider: lines
    # completed meanwhile are paid for and must be imported too.
    session.simulate(
        latency_ms=0, batch_lines_per_second=speed, batch_cancel_seconds=1.0, batch_validating_seconds=0
    )
    with session.web_and_cluster(workers, STRINGSIGHT_BATCH_POLL_SECONDS=POLL_SECONDS) as (web, _):
        api = session.api(web)
        job_id = api.expect(api.start(start_body(rows, mode="batch", use_cache=False)), 201)["job_id"]
        started = max(3, len(rows) // 10)
        wait_for(
            lambda: (
                (found := ProviderBatch.objects.filter(job_id=job_id).exclude(batch_id="").first())
                and found.request_counts.get("completed", 0) >= started
            ),
            600,
            f"{started} lines completed at the provider",
            0.1,
        )
        response = api.cancel(job_id)
        answer = api.expect(response)
        wait_for(
            lambda: not pending_provider_results(job_id=job_id), 600, "the cancelled batch's import", 0.1
        )
    completed = {
        int(line["custom_id"].split(":")[1])
        for line in session.simulator.batch_lines()
        if line["status"] == 200 and line["custom_id"].startswith(job_id)
    }
    imported = set(
        ExtractRow.objects.filter(job_id=job_id, status=RowStatus.DONE).values_list("index", flat=True)
    )
    cancel_ms = response.seconds * 1000
    report.figure(
        "cancel answer", answer["state"], "{}", target="cancelled", ok=answer["state"] == "cancelled"
    )
    report.figure(
        "cancel answer ms", cancel_ms, target=f"<= {TARGET_CANCEL_MS}", ok=cancel_ms <= TARGET_CANCEL_MS
    )
    report.figure(
        "lines completed at the provider / imported",
        f"{len(completed):,} / {len(imported):,} of {len(rows):,}",
    )
    lost = len(completed - imported)
    report.figure("completed lines lost", lost, "{:,}", target="0", ok=lost == 0)
    report.figure(
        "rows imported that the provider did not complete", len(imported - completed), "{:,}", target="0"
    )


def run(session: harness.Session, args) -> Report:
    count = harness.sized(args, "rows", 5000, 24)
    workers = harness.sized(args, "workers", 2, 1)
    max_workers = harness.sized(args, "max_workers", 64, 8)
    speed = harness.sized(args, "lines_per_second", 50.0, 4.0)
    report = Report(f"#13 batch mode ({session.kind})", smoke=args.smoke)
    session.describe(report, workers=workers)
    rows = airline_rows(count)
    report.setting("rows", rows_description(rows, "airline demo"))
    report.setting(
        "simulator",
        f"online: {args.latency_ms:g} ms latency, max_workers {max_workers}; batch: its default speed; "
        f"cancel trial: {speed:g} lines/s, a cancel taking 1 s",
    )
    report.setting("batch poll", f"STRINGSIGHT_BATCH_POLL_SECONDS={POLL_SECONDS}")

    session.fresh_database()
    compare(session, report, rows, workers=workers, max_workers=max_workers, latency_ms=args.latency_ms)
    cancel_trial(session, report, airline_rows(count, first=count), workers=workers, speed=speed)
    return report


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
