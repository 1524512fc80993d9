"""#6 worker memory: the peak RSS of the worker process running a 50,000-row
job is at most 1.2 times that of one running a 1,000-row job (memory is
bounded by the chunk, not the job). 0 ms simulated latency, Q_WORKERS=1.

    python bench/b6_worker_memory.py --db postgres [--small N] [--large N] [--smoke]

Each size runs on a fresh qcluster, so each peak is that job's own; the
peak is the kernel's VmHWM of each task-running process (not the sentinel,
pusher or monitor), checked against psutil's sampled maximum.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.api import run_job
from bench.measure import Report, vm_hwm_bytes
from bench.rows import start_body, synthetic_rows

TARGET_RATIO = 1.2
MIB = 2**20


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--small", type=int, help="rows of the small job (default 1,000; smoke 20)")
    parser.add_argument("--large", type=int, help="rows of the large job (default 50,000; smoke 100)")
    parser.add_argument("--max-workers", type=int, default=64, help="the jobs' concurrency")
    return parser


def measure(session: harness.Session, web, rows: int, *, workers: int, max_workers: int) -> dict:
    body = start_body(synthetic_rows(rows), max_workers=max_workers)
    with session.cluster(workers) as cluster, session.sampler(web=web, cluster=cluster) as sampler:
        job = run_job(session.api(web), sampler, body)
        pids = cluster.worker_pids()
        hwm = max(vm_hwm_bytes(pid) or 0 for pid in pids)
    sampled = max(job.window.peak_rss.get(("worker", pid), 0) for pid in pids)
    return {"rows": rows, "hwm": hwm, "sampled": sampled, "job": job}


def run(session: harness.Session, args) -> Report:
    small = harness.sized(args, "small", 1000, 20)
    large = harness.sized(args, "large", 50_000, 100)
    workers = args.workers or 1
    report = Report(f"#6 worker memory ({session.kind})", smoke=args.smoke)
    session.describe(report, workers=workers)
    report.setting(
        "jobs",
        f"{small:,} then {large:,} synthetic rows (~1 KB), 0 ms latency, max_workers {args.max_workers}",
    )

    session.fresh_database()
    session.simulate(latency_ms=0)
    with session.web() as web:
        results = [
            measure(session, web, rows, workers=workers, max_workers=args.max_workers)
            for rows in (small, large)
        ]

    for result in results:
        job = result["job"]
        report.figure(
            f"{result['rows']:,} rows: worker peak RSS (VmHWM / sampled), MiB",
            f"{result['hwm'] / MIB:,.1f} / {result['sampled'] / MIB:,.1f}",
        )
        report.figure(f"{result['rows']:,} rows: running seconds", job.running_seconds, "{:,.1f}")
    ratio = results[1]["hwm"] / results[0]["hwm"]
    report.figure(
        f"peak RSS ratio {large:,} / {small:,} rows",
        ratio,
        "{:.3f}",
        target=f"<= {TARGET_RATIO}",
        ok=ratio <= TARGET_RATIO,
    )
    return report


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
