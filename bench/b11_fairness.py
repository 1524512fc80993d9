"""#11 fairness: several jobs of several users on shared worker processes
(issue 13), with the default settings unless a scenario says otherwise.

- a small job started while a big one runs: done within max(3 s, 3x its
  time alone);
- six users' jobs started at once: all advance within one 2 s window, the
  last finishes within 1.5x the first;
- four equal jobs of four users: each gets 25 +- 5 % of the calls while
  all four run;
- eight jobs on 2 and on 4 worker processes: rows/s at least 90 % of the
  ideal (the calls in flight the jobs and workers allow, over the latency).

    python bench/b11_fairness.py --db sqlite|postgres|both [--smoke]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.api import Api, timestamp, wait_for
from bench.measure import Report
from bench.rows import airline_rows, start_body


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--latency-ms", type=float, default=200.0, help="simulated latency")
    return parser


def tagged(rows: list[dict], tag: str) -> list[dict]:
    """Rows whose calls the simulator's log can tell apart by `tag`."""
    return [{**row, "prompt": f"[{tag}] {row['prompt']}"} for row in rows]


def users(session, count: int, web) -> list[Api]:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    apis = []
    for _ in range(count):
        number = get_user_model().objects.count()
        user = get_user_model().objects.create_user(f"user{number}", password=None)
        apis.append(Api(web.base_url, Token.objects.create(user=user).key))
    return apis


def start(api: Api, rows: list[dict], **params) -> str:
    return api.expect(api.start(start_body(rows, **params)), 201)["job_id"]


def job_times(job_id) -> dict:
    """created, first row done, finished (epoch seconds) and rows done."""
    from jobs.models import ExtractJob, ExtractRow

    job = ExtractJob.objects.get(pk=job_id)
    done = ExtractRow.objects.filter(job_id=job_id, finished_at__isnull=False).order_by("finished_at")
    first = done.first()
    return {
        "created": job.created_at.timestamp(),
        "first_row": first.finished_at.timestamp() if first else None,
        "finished": job.finished_at.timestamp() if job.finished_at else None,
        "done": job.count_done,
    }


def small_beside_big(session, args, report: Report) -> None:
    rows_big = harness.sized(args, "big", 5000, 600)
    with session.web() as web, session.cluster(2):
        alone_api, big_api, small_api = users(session, 3, web)
        session.simulate(latency_ms=args.latency_ms)
        alone = start(alone_api, tagged(airline_rows(16), "alone"), max_workers=16)
        final = alone_api.wait_finished(alone, interval=0.05, timeout=120)
        alone_seconds = timestamp(final["finished_at"]) - timestamp(final["created_at"])

        big = start(big_api, tagged(airline_rows(rows_big, first=100), "big"), max_workers=64)
        wait_for(lambda: session.simulator.stats()["in_flight"] >= 32, 120, "the big job at full speed")
        small = start(small_api, tagged(airline_rows(16, first=200), "small"), max_workers=16)
        final = small_api.wait_finished(small, interval=0.05, timeout=300)
        small_seconds = timestamp(final["finished_at"]) - timestamp(final["created_at"])
        big_state = big_api.expect(big_api.status(big))
        first_call = min(
            request["started_at"]
            for request in session.simulator.requests()
            if "[small]" in (request.get("user_preview") or "")
        )
        big_api.expect(big_api.cancel(big))
    target = max(3.0, 3 * alone_seconds)
    report.figure("a 16-row job alone: start → done, s", alone_seconds, "{:,.2f}")
    report.figure(
        f"the same started while a {rows_big:,}-row job runs: start → done, s",
        small_seconds,
        "{:,.2f}",
        target=f"<= {target:.2f} (max(3 s, 3x alone))",
        ok=small_seconds <= target and big_state["state"] == "running",
    )
    report.figure(
        "its first LLM call, s after its start",
        first_call - timestamp(final["created_at"]),
        "{:,.2f}",
        target="<= 0.5",
        ok=first_call - timestamp(final["created_at"]) <= 0.5,
    )


def six_users(session, args, report: Report) -> None:
    rows = harness.sized(args, "rows", 150, 40)
    with session.web() as web, session.cluster(2):
        apis = users(session, 6, web)
        session.simulate(latency_ms=args.latency_ms)
        jobs = [
            start(api, tagged(airline_rows(rows, first=300 + 150 * n), f"six{n}"), max_workers=16)
            for n, api in enumerate(apis)
        ]
        for api, job_id in zip(apis, jobs, strict=True):
            api.wait_finished(job_id, interval=0.1, timeout=600)
    times = [job_times(job_id) for job_id in jobs]
    started = min(t["created"] for t in times)
    firsts = [t["first_row"] for t in times]
    ends = sorted(t["finished"] - started for t in times)
    spread = max(firsts) - min(firsts)
    report.figure(
        f"6 users x {rows} rows at once: first rows done of all 6 within, s",
        spread,
        "{:,.2f}",
        target="<= 2",
        ok=spread <= 2,
    )
    report.figure(
        "last finish / first finish (from the starts)",
        ends[-1] / ends[0],
        "{:,.2f}",
        target="<= 1.5",
        ok=ends[-1] / ends[0] <= 1.5,
    )
    report.figure("finishes, s after the starts", " / ".join(f"{end:.1f}" for end in ends))


def four_equal(session, args, report: Report) -> None:
    rows = harness.sized(args, "rows", 400, 80)
    with session.web() as web, session.cluster(2):
        apis = users(session, 4, web)
        session.simulate(latency_ms=args.latency_ms)
        jobs = [
            start(api, tagged(airline_rows(rows, first=1300 + rows * n), f"four{n}"), max_workers=64)
            for n, api in enumerate(apis)
        ]
        for api, job_id in zip(apis, jobs, strict=True):
            api.wait_finished(job_id, interval=0.1, timeout=600)
    times = [job_times(job_id) for job_id in jobs]
    window = (max(t["first_row"] for t in times), min(t["finished"] for t in times))
    calls = {n: 0 for n in range(4)}
    for request in session.simulator.requests():
        preview = request.get("user_preview") or ""
        for n in range(4):
            if f"[four{n}]" in preview and window[0] <= request["started_at"] <= window[1]:
                calls[n] += 1
    total = sum(calls.values())
    shares = [calls[n] / total for n in range(4)] if total else [0.0] * 4
    report.figure(
        "4 equal jobs of 4 users: each one's share of the calls while all 4 run, %",
        " / ".join(f"{share:.1%}" for share in shares),
        target="25 ± 5 % each",
        ok=all(abs(share - 0.25) <= 0.05 for share in shares),
    )


def throughput(session, args, report: Report, processes: int) -> None:
    concurrency, jobs_count, max_workers = 16, 8, 8
    # Jobs of 20 s, so that the steady state, not the first and last
    # seconds of each job, makes the figure.
    rows = harness.sized(args, "rows", 800, 40)
    ideal = min(jobs_count * max_workers, processes * concurrency) / (args.latency_ms / 1000)
    env = {"STRINGSIGHT_WORKER_CONCURRENCY": str(concurrency)}
    with session.web(**env) as web, session.cluster(processes, **env):
        apis = users(session, jobs_count, web)
        session.simulate(latency_ms=args.latency_ms)
        jobs = [
            start(api, tagged(airline_rows(rows, first=3000 + rows * n), f"t{processes}-{n}"), max_workers=8)
            for n, api in enumerate(apis)
        ]
        for api, job_id in zip(apis, jobs, strict=True):
            api.wait_finished(job_id, interval=0.1, timeout=900)
    times = [job_times(job_id) for job_id in jobs]
    # While every job runs: from the last first row to the first finish.
    begin, end = max(t["first_row"] for t in times), min(t["finished"] for t in times)
    from jobs.models import ExtractRow

    done = ExtractRow.objects.filter(
        job_id__in=jobs, finished_at__gte=_moment(begin), finished_at__lte=_moment(end)
    ).count()
    rate = done / (end - begin) if end > begin else 0.0
    report.figure(
        f"8 jobs of max_workers {max_workers}, {processes} x {concurrency} calls: rows/s, all running",
        rate,
        "{:,.0f}",
        target=f">= {0.9 * ideal:,.0f} (90 % of {ideal:,.0f})",
        ok=rate >= 0.9 * ideal,
    )


def per_call_costs(session, args, report: Report) -> None:
    """What a call in flight costs a worker process: its peak memory with
    many calls in flight against few (slow answers, so they are all in
    flight at once), and its CPU per answer."""
    from bench.api import run_job
    from bench.measure import vm_hwm_bytes

    rows = harness.sized(args, "rows", 1024, 32)
    peaks, cpu = {}, {}
    for calls in (16, 256):
        env = {"STRINGSIGHT_WORKER_CONCURRENCY": str(calls)}
        session.simulate(latency_ms=2000)
        with session.web(**env) as web, session.cluster(1, **env) as cluster:
            with session.sampler(web=web, cluster=cluster) as sampler:
                body = start_body(
                    tagged(airline_rows(rows, first=5000 + calls), f"cost{calls}"), max_workers=calls
                )
                job = run_job(session.api(web), sampler, body, poll_interval=0.1)
            peaks[calls] = max(vm_hwm_bytes(pid) or 0 for pid in cluster.worker_pids())
            cpu[calls] = job.window.cpu["worker"] / job.finished_rows
    per_call = (peaks[256] - peaks[16]) / 240
    report.figure(
        "worker memory per call in flight (peak RSS, 256 vs 16 in flight), KiB", per_call / 1024, "{:,.0f}"
    )
    report.figure(
        "worker CPU per answer (16 / 256 in flight), ms", f"{cpu[16] * 1000:.2f} / {cpu[256] * 1000:.2f}"
    )


def _moment(seconds: float):
    import datetime

    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def run(session: harness.Session, args) -> Report:
    report = Report(f"#11 fairness between jobs and users ({session.kind})", smoke=args.smoke)
    session.describe(report, workers=2)
    report.setting("simulated latency", f"{args.latency_ms:,g} ms")
    report.setting(
        "settings",
        "defaults (STRINGSIGHT_WORKER_CONCURRENCY=64), but the throughput rows: 16 calls per process",
    )
    session.fresh_database()
    small_beside_big(session, args, report)
    six_users(session, args, report)
    four_equal(session, args, report)
    for processes in (2, 4):
        throughput(session, args, report, processes)
    per_call_costs(session, args, report)
    return report


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
