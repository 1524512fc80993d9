"""#7 against the naive design: the upstream seed's approach (one thread pool
over all rows in one process, no database) on the same rows, simulator,
latency and concurrency. Target: our wall time is within 10 % of it, while
keeping durability and cancel.

    python bench/b7_naive.py --db postgres [--rows N] [--workers N] [--smoke]

The naive run sends exactly the messages and arguments our worker sends
(`build_messages`, `request_arguments` on the spec `jobs.runner` builds),
through the synchronous `openai.OpenAI` client, and parses each answer with
`parse_properties`. Our wall time runs from sending the start request to
the job's finished_at, so it includes uploading and storing the rows.
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.api import job_figures
from bench.measure import Report, mean_in_flight
from bench.rows import airline_rows, default_spec, rows_description, start_body

TARGET_OVERHEAD = 0.10


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--rows", type=int, help="default 5,000 (smoke 24)")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument(
        "--concurrency", type=int, help="thread pool size = max_workers (default 64; smoke 8)"
    )
    return parser


def run_naive(rows: list[dict], *, base_url: str, concurrency: int) -> dict:
    """All rows through one thread pool in this process, results in a list."""
    import openai

    from extraction.extract import build_messages, model_names
    from extraction.llm import request_arguments
    from extraction.parse import parse_properties
    from extraction.rows import question_id_for, validate_rows

    started, wall_started = time.perf_counter(), time.time()
    method = validate_rows(rows)
    spec = default_spec(method)
    client = openai.OpenAI(api_key="sim-key", base_url=base_url, timeout=120)

    def extract(indexed):
        index, row = indexed
        response = client.chat.completions.create(**request_arguments(build_messages(row, spec), spec.call))
        return parse_properties(
            response.choices[0].message.content or "",
            method=method,
            model_names=model_names(row, method),
            question_id=question_id_for(row, index),
        )

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(extract, enumerate(rows)))
    client.close()
    return {
        "seconds": time.perf_counter() - started,
        "started_at": wall_started,
        "finished_at": time.time(),
        "properties": sum(len(result.properties) for result in results),
        "failed": sum(not result.properties for result in results),
    }


def run(session: harness.Session, args) -> Report:
    rows = harness.sized(args, "rows", 5000, 24)
    concurrency = harness.sized(args, "concurrency", 64, 8)
    workers = harness.sized(args, "workers", 2, 1)
    batch = airline_rows(rows)
    report = Report(f"#7 against the naive design ({session.kind})", smoke=args.smoke)
    session.describe(report, workers=workers)
    report.setting("rows", rows_description(batch, "airline demo"))
    report.setting(
        "simulated latency", f"{args.latency_ms:g} ms, no jitter; concurrency {concurrency} in both"
    )

    session.fresh_database()
    session.simulate(latency_ms=args.latency_ms)
    naive = run_naive(batch, base_url=session.simulator.base_url, concurrency=concurrency)
    naive_in_flight = mean_in_flight(session.simulator.requests(), naive["started_at"], naive["finished_at"])
    # Our run gets a clean request log and counters.
    session.simulate(latency_ms=args.latency_ms)
    body = start_body(batch, max_workers=concurrency)
    ours = session.run_job(body, workers=workers)

    overhead = ours.e2e_seconds / naive["seconds"] - 1
    report.figure("naive: wall seconds (thread pool, no database)", naive["seconds"], "{:,.2f}")
    report.figure("naive: properties / rows without one", f"{naive['properties']:,} / {naive['failed']:,}")
    report.figure("naive: LLM calls in flight, mean (simulator log)", naive_in_flight)
    report.figure("ours: end to end seconds (POST sent → finished_at)", ours.e2e_seconds, "{:,.2f}")
    report.figure("ours: properties", ours.final["properties_count"], "{:,}")
    report.figure(
        "ours vs naive, end to end",
        overhead,
        "{:+.1%}",
        target=f"<= +{TARGET_OVERHEAD:.0%}",
        ok=overhead <= TARGET_OVERHEAD,
    )
    report.figure(
        "ours vs naive, running only (started_at → finished_at)",
        ours.running_seconds / naive["seconds"] - 1,
        "{:+.1%}",
    )
    job_figures(report, ours, session.simulator.requests())
    session.cpu_figures(report, ours.window, per=ours.finished_rows)
    return report


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
