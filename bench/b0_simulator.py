"""#0 the simulator's own capacity, so that no other figure is bounded by it:
requests/s it serves at 0 ms latency and the CPU it spends per request (its
capacity on one core is 1000 / that), then 64 calls of 200 ms at once, the
rate #1 needs (320 requests/s). The client's own CPU per request is shown
too: the `AsyncOpenAI` SDK's cost is a floor for a worker's CPU per row.

    python bench/b0_simulator.py [--requests N] [--smoke]

The client is one asyncio process making the call our worker makes
(`extraction.llm`: the `AsyncOpenAI` SDK over its aiohttp transport), with
the messages our worker sends for the demo transcripts; it needs no
database, so --db only names the session.
"""

import asyncio
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.measure import Report, Sampler, tree_pids
from bench.rows import airline_rows, default_spec

# Twice the fastest rate any target asks of the system (#2's 500 rows/s).
TARGET_CAPACITY = 1000


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument("--requests", type=int, help="requests per phase (default 3,000; smoke 60)")
    parser.add_argument("--concurrency", type=int, default=64)
    return parser


def request_messages(count: int) -> list[list[dict]]:
    from extraction.extract import build_messages

    spec = default_spec("single_model")
    return [build_messages(row, spec) for row in airline_rows(count)]


async def drive(base_url: str, requests: list[list[dict]], concurrency: int) -> float:
    from extraction.llm import complete, make_client

    client = make_client(api_key="sim-key", base_url=base_url, timeout=60)
    call = default_spec("single_model").call
    slots = asyncio.Semaphore(concurrency)

    async def one(messages):
        async with slots:
            await complete(client, messages, call)

    started = time.perf_counter()
    await asyncio.gather(*(one(messages) for messages in requests))
    seconds = time.perf_counter() - started
    await client.close()
    return seconds


def phase(session: harness.Session, requests: list[list[dict]], *, latency_ms: float, concurrency: int):
    session.simulate(latency_ms=latency_ms)
    groups = {"simulator": tree_pids(session.simulator_pid), "client": tree_pids(os.getpid())}
    with Sampler(groups) as sampler:
        window = sampler.open_window()
        seconds = asyncio.run(drive(session.simulator.base_url, requests, concurrency))
        sampler.close_window(window)
    stats = session.simulator.stats()
    if stats["by_outcome"] != {"ok": len(requests)}:
        raise RuntimeError(f"the simulator did not answer every request ok: {stats}")
    return len(requests) / seconds, window


def run(session: harness.Session, args) -> Report:
    count = harness.sized(args, "requests", 3000, 60)
    concurrency = args.concurrency
    report = Report("#0 simulator capacity", smoke=args.smoke)
    report.setting("client", f"one asyncio process, AsyncOpenAI, {concurrency} requests at once")
    report.setting(
        "requests", f"{count:,} per phase, the messages our worker sends for the airline demo rows"
    )
    requests = request_messages(count)

    rate, window = phase(session, requests, latency_ms=0, concurrency=concurrency)
    cpu_ms = window.cpu_ms_per("simulator", count)
    capacity = 1000 / cpu_ms if cpu_ms else float("inf")
    report.figure("0 ms latency: requests/s served", rate)
    report.figure("0 ms latency: simulator CPU ms/request", cpu_ms, "{:.2f}")
    report.figure(
        "simulator capacity on one core (1000 / CPU ms)",
        capacity,
        "{:,.0f}",
        target=f">= {TARGET_CAPACITY:,} req/s",
        ok=capacity >= TARGET_CAPACITY,
    )
    report.figure(
        "0 ms latency: client (AsyncOpenAI) CPU ms/request, a floor for a worker's CPU per row",
        window.cpu_ms_per("client", count),
        "{:.2f}",
    )
    report.figure(
        "0 ms latency: CPU busy (100% = one core)",
        f"simulator {window.busy('simulator'):.0%}, client {window.busy('client'):.0%}",
    )

    ideal = concurrency / 0.2
    rate, window = phase(session, requests, latency_ms=200, concurrency=concurrency)
    report.figure(f"200 ms latency x {concurrency}: requests/s (ideal {ideal:,.0f})", rate)
    report.figure(
        "200 ms latency: CPU busy",
        f"simulator {window.busy('simulator'):.0%}, client {window.busy('client'):.0%}",
    )
    report.note(
        "where the 200 ms phase falls short of the ideal, the one-process client is the limit, "
        "not the simulator: compare their CPU busy figures."
    )
    return report


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
