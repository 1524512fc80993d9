"""#5 start: 10,000 rows of about 1 KB in one request are accepted and
committed (the 201 is sent after the commit) in <= 2 s.

    python bench/b5_start.py --db postgres [--rows N] [--trials N] [--smoke]

No worker runs, so nothing competes with the start for the database; each
trial's rows are checked in the database after its 201.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.api import ApiError
from bench.measure import Report, percentile
from bench.rows import rows_description, start_body, synthetic_rows

TARGET_SECONDS = 2.0


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--rows", type=int, help="rows per request (default 10,000; smoke 200)")
    parser.add_argument("--row-bytes", type=int, default=1024)
    parser.add_argument("--trials", type=int, help="start requests to time (default 5; smoke 2)")
    return parser


def stored_rows(job_id: str) -> int:
    from jobs.models import ExtractRow

    return ExtractRow.objects.filter(job_id=job_id).count()


def run(session: harness.Session, args) -> Report:
    rows = harness.sized(args, "rows", 10_000, 200)
    trials = harness.sized(args, "trials", 5, 2)
    batch = synthetic_rows(rows, size=args.row_bytes)
    body = start_body(batch)
    report = Report(f"#5 start ({session.kind})", smoke=args.smoke)
    session.describe(report)
    report.setting("qcluster", "none, so nothing competes with the start for the database")
    report.setting("request", f"{rows_description(batch, 'synthetic')}, {len(body) / 2**20:,.1f} MiB of JSON")
    report.setting("trials", f"{trials} start requests, one after another, on one database")

    session.fresh_database()
    seconds = []
    with session.web() as web, session.sampler(web=web, simulator=False) as sampler:
        api = session.api(web)
        window = sampler.open_window()
        for _ in range(trials):
            response = api.start(body)
            job = api.expect(response, 201)
            if stored_rows(job["job_id"]) != rows:
                raise ApiError(f"job {job['job_id']} was answered 201 before its rows were stored")
            seconds.append(response.seconds)
        sampler.close_window(window)

    median = percentile(seconds, 50)
    report.figure("POST → 201 seconds, each trial", " / ".join(f"{s:.2f}" for s in seconds))
    report.figure(
        "POST → 201 seconds, median",
        median,
        "{:.2f}",
        target=f"<= {TARGET_SECONDS:g}",
        ok=median <= TARGET_SECONDS,
    )
    report.figure("POST → 201 seconds, max", max(seconds), "{:.2f}")
    report.figure("rows/s accepted (median)", rows / median, "{:,.0f}")
    session.cpu_figures(report, window, per=rows * trials)
    return report


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
