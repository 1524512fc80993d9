"""#1 throughput: 5,000 rows at 200 ms simulated latency with max_workers 64
reach at least 90 % of the ideal rate, concurrency / latency (320 rows/s).

    python bench/b1_throughput.py --db postgres [--rows N] [--workers N] [--smoke]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.api import job_figures
from bench.measure import Report
from bench.rows import airline_rows, rows_description, start_body

TARGET_SHARE = 0.90


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--rows", type=int, help="default 5,000 (smoke 24)")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--max-workers", type=int, help="the job's concurrency (default 64, smoke 8)")
    return parser


def run(session: harness.Session, args) -> Report:
    rows = harness.sized(args, "rows", 5000, 24)
    workers = harness.sized(args, "workers", 2, 1)
    max_workers = harness.sized(args, "max_workers", 64, 8)
    ideal = max_workers / (args.latency_ms / 1000)
    report = Report(f"#1 throughput ({session.kind})", smoke=args.smoke)
    session.describe(report, workers=workers)
    batch = airline_rows(rows)
    report.setting("rows", rows_description(batch, "airline demo"))
    report.setting("simulated latency", f"{args.latency_ms:g} ms, no jitter; max_workers {max_workers}")

    session.fresh_database()
    session.simulate(latency_ms=args.latency_ms)
    body = start_body(batch, max_workers=max_workers)
    job = session.run_job(body, workers=workers)
    simulator = session.simulator.stats()

    rate = job.finished_rows / job.running_seconds
    report.figure("ideal rows/s (max_workers / latency)", ideal)
    report.figure("rows/s while running", rate, target=f">= {TARGET_SHARE * ideal:,.0f}")
    report.figure(
        "share of ideal",
        rate / ideal,
        "{:.1%}",
        target=f">= {TARGET_SHARE:.0%}",
        ok=rate >= TARGET_SHARE * ideal,
    )
    report.figure("rows/s end to end (start request included)", job.finished_rows / job.e2e_seconds)
    job_figures(report, job, session.simulator.requests())
    report.figure("LLM calls in flight at most (simulator)", simulator["max_in_flight"], "{:,}")
    session.cpu_figures(report, job.window, per=job.finished_rows)
    return report


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
