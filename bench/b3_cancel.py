"""#3 cancel: 20 trials, each cancelling a job with 64 LLM calls in flight at
2 s simulated latency. Targets: the cancel answers within 100 ms (p95); the
last connection open at the cancel closes within 500 ms of it (p95); no LLM
call starts later than 250 ms after it. Then as many trials at 200 ms, where
calls end and start all the time, count the calls that still start after a
cancel.

    python bench/b3_cancel.py --db postgres [--trials N] [--workers N] [--smoke]

Times come from the simulator's request log (`GET /_sim/requests`), whose
clock is this machine's, like the time the cancel was sent.
"""

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.api import Api, ApiError, wait_for
from bench.measure import Report, percentile
from bench.rows import airline_rows, start_body

LATE_AFTER = 0.25
CHURN_MS = 200
TARGET_RESPONSE_MS = 100
TARGET_CLOSED_MS = 500


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--trials", type=int, help="default 20 (smoke 2)")
    parser.add_argument(
        "--in-flight", type=int, help="the job's max_workers, cancelled when all are in flight (64; smoke 8)"
    )
    parser.add_argument("--latency-ms", type=float, default=2000.0)
    parser.add_argument(
        "--settle", type=float, help="seconds to watch for late calls after each cancel (1; smoke 0.5)"
    )
    return parser


def trial(
    session: harness.Session, api: Api, *, number: int, rows: int, in_flight: int, settle: float, run_for=0.0
):
    simulator = session.simulator
    since = simulator.stats()["requests_total"]
    body = start_body(airline_rows(rows, first=number * rows), max_workers=in_flight)
    job_id = api.expect(api.start(body), 201)["job_id"]
    wait_for(lambda: simulator.stats()["in_flight"] >= in_flight, 60, f"{in_flight} calls in flight", 0.01)
    time.sleep(run_for)

    cancel_sent = time.time()
    response = api.cancel(job_id)
    answer = api.expect(response)
    if answer["state"] != "cancelled":
        raise ApiError(f"cancel answered {answer}")
    wait_for(lambda: simulator.stats()["in_flight"] == 0, 30, "every call to end", 0.01)
    # A call that starts late would show up in this time.
    time.sleep(settle)

    requests = simulator.requests(since)
    open_at_cancel = [
        r
        for r in requests
        if r["started_at"] <= cancel_sent and (r["ended_at"] or float("inf")) > cancel_sent
    ]
    last_end = max((r["ended_at"] or float("inf") for r in open_at_cancel), default=cancel_sent)
    return {
        "response_ms": response.seconds * 1000,
        "closed_ms": (last_end - cancel_sent) * 1000,
        "open_at_cancel": len(open_at_cancel),
        "aborted": sum(r["outcome"] == "aborted" for r in open_at_cancel),
        "late": sum(r["started_at"] > cancel_sent + LATE_AFTER for r in requests),
        "after": [r["started_at"] - cancel_sent for r in requests if r["started_at"] > cancel_sent],
    }


def run(session: harness.Session, args) -> Report:
    trials = harness.sized(args, "trials", 20, 2)
    in_flight = harness.sized(args, "in_flight", 64, 8)
    workers = harness.sized(args, "workers", 2, 1)
    settle = harness.sized(args, "settle", 1.0, 0.5)
    rows = in_flight * 4
    report = Report(f"#3 cancel ({session.kind})", smoke=args.smoke)
    session.describe(report, workers=workers)
    report.setting(
        "trials",
        f"{trials} jobs of {rows} airline demo rows, max_workers {in_flight}, "
        f"simulated latency {args.latency_ms:g} ms; each cancelled once {in_flight} calls are in flight",
    )

    session.fresh_database()
    session.simulate(latency_ms=args.latency_ms)
    with session.web_and_cluster(workers) as (web, _):
        api = session.api(web)
        results = [
            trial(session, api, number=number, rows=rows, in_flight=in_flight, settle=settle)
            for number in range(trials)
        ]
        # At 2 s no call ends near the cancel, so none is due to start. At
        # CHURN_MS calls end and start all the time: those that still start
        # after the cancel was sent (from a worker's ready rows, until its
        # next poll) show how soon a cancel stops new calls.
        session.simulate(latency_ms=CHURN_MS)
        churning = [
            trial(
                session,
                api,
                number=trials + number,
                rows=rows * 2,
                in_flight=in_flight,
                settle=settle,
                run_for=CHURN_MS / 1000 * 2.5,
            )
            for number in range(trials)
        ]

    response = [r["response_ms"] for r in results]
    closed = [r["closed_ms"] for r in results]
    late = sum(r["late"] for r in results)
    p95_response, p95_closed = percentile(response, 95), percentile(closed, 95)
    report.figure("cancel response ms p50 / p95 / max", spread(response))
    report.figure(
        "cancel response ms p95",
        p95_response,
        target=f"<= {TARGET_RESPONSE_MS}",
        ok=p95_response <= TARGET_RESPONSE_MS,
    )
    report.figure("last in-flight call closed, ms after cancel, p50 / p95 / max", spread(closed))
    report.figure(
        "last in-flight call closed ms p95",
        p95_closed,
        target=f"<= {TARGET_CLOSED_MS}",
        ok=p95_closed <= TARGET_CLOSED_MS,
    )
    report.figure(
        f"LLM calls started > {LATE_AFTER * 1000:.0f} ms after a cancel",
        late,
        "{:,}",
        target="0",
        ok=late == 0,
    )
    report.figure(
        "calls open at the cancel / of them aborted (all trials)",
        f"{sum(r['open_at_cancel'] for r in results):,} / {sum(r['aborted'] for r in results):,}",
    )
    after = [delay * 1000 for r in churning for delay in r["after"]]
    late = sum(r["late"] for r in churning)
    report.figure(
        f"at {CHURN_MS} ms latency: calls started after the cancel was sent, per trial mean / max",
        f"{len(after) / len(churning):.1f} / {max((len(r['after']) for r in churning), default=0)}",
    )
    report.figure(
        f"at {CHURN_MS} ms latency: the latest of them, ms after the cancel was sent",
        max(after, default=0.0),
    )
    report.figure(
        f"at {CHURN_MS} ms latency: LLM calls started > {LATE_AFTER * 1000:.0f} ms after a cancel",
        late,
        "{:,}",
        target="0",
        ok=late == 0,
    )
    return report


def spread(values: list[float]) -> str:
    return f"{percentile(values, 50):,.1f} / {percentile(values, 95):,.1f} / {max(values):,.1f}"


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
