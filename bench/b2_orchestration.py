"""#2 orchestration cost: 5,000 rows at 0 ms simulated latency through one
worker process run at >= 500 rows/s end to end; CPU ms per row in the web
server, the worker and the database.

    python bench/b2_orchestration.py --db postgres [--rows N] [--workers N] [--smoke]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.api import job_figures
from bench.measure import Report
from bench.rows import airline_rows, rows_description, start_body

TARGET_ROWS_PER_SECOND = 500


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--rows", type=int, help="default 5,000 (smoke 40)")
    parser.add_argument("--max-workers", type=int, default=64, help="the job's concurrency")
    return parser


def run(session: harness.Session, args) -> Report:
    rows = harness.sized(args, "rows", 5000, 40)
    workers = args.workers or 1
    report = Report(f"#2 orchestration cost ({session.kind})", smoke=args.smoke)
    session.describe(report, workers=workers)
    batch = airline_rows(rows)
    report.setting("rows", rows_description(batch, "airline demo"))
    report.setting("simulated latency", f"0 ms; max_workers {args.max_workers}")

    session.fresh_database()
    session.simulate(latency_ms=0)
    body = start_body(batch, max_workers=args.max_workers)
    job = session.run_job(body, workers=workers)

    e2e_rate = job.finished_rows / job.e2e_seconds
    report.figure(
        "rows/s end to end (start request included)",
        e2e_rate,
        target=f">= {TARGET_ROWS_PER_SECOND}",
        ok=e2e_rate >= TARGET_ROWS_PER_SECOND,
    )
    report.figure("rows/s while running", job.finished_rows / job.running_seconds)
    job_figures(report, job, session.simulator.requests())
    session.cpu_figures(report, job.window, per=job.finished_rows)
    report.note("web CPU includes parsing, validating and storing the start request, and the status polls.")
    return report


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
