"""Memory per request (issue 19): what one start costs the web process, per
byte of body, for real transcripts and for the hostile body
`{"rows": [{}, {}, …]}`, and what it keeps after answering.

    python bench/b10_body_memory.py --db postgres [--rows N] [--hostile-mb N] [--smoke]

Each body is sent to a gunicorn with one worker process; the worker's peak
RSS (VmHWM, reset before each request through /proc/PID/clear_refs) and its
RSS after the answer are read from /proc. The web server's own limits are
the project's defaults except the body limit, raised so the hostile body
meets the parser rather than the Content-Length check.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench import harness
from bench.measure import Report
from bench.rows import airline_rows, start_body

MB = 1024 * 1024
TARGET_HOSTILE_MB = 100


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument(
        "--rows", type=int, help="real transcripts in the large start (default 5,000; smoke 50)"
    )
    parser.add_argument("--hostile-mb", type=int, help="size of the hostile body (default 20; smoke 2)")
    return parser


def memory(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {}
    for line in status.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def measure(api, pid: int, body: bytes) -> dict:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = memory(pid)["VmRSS"]
    response = api.start(body)
    after = memory(pid)
    return {
        "status": response.status,
        "seconds": response.seconds,
        "peak": after["VmHWM"] - before,
        "kept": after["VmRSS"] - before,
        "detail": response.json().get("detail", "") if response.status != 201 else "",
    }


def run(session: harness.Session, args) -> Report:
    rows = harness.sized(args, "rows", 5_000, 50)
    hostile_mb = harness.sized(args, "hostile_mb", 20, 2)
    workers, session.web_workers = session.web_workers, 1
    real = start_body(airline_rows(rows))
    hostile = b'{"rows": [' + b",".join([b"{}"] * (hostile_mb * MB // 3)) + b"]}"
    report = Report(f"#10 memory per request ({session.kind})", smoke=args.smoke)
    session.describe(report)
    report.setting("real body", f"{rows:,} airline transcripts, {len(real) / MB:,.1f} MiB")
    report.setting("hostile body", f'{{"rows": [{{}}, {{}}, …]}}, {len(hostile) / MB:,.1f} MiB')

    session.fresh_database()
    try:
        results = measure_both(session, real, hostile)
    finally:
        session.web_workers = workers

    for name, body in (("real", real), ("hostile", hostile)):
        result = results[name]
        report.figure(
            f"{name}: answer", f"{result['status']} in {result['seconds']:.2f} s {result['detail']}"
        )
        report.figure(f"{name}: peak RSS growth, MiB", result["peak"] / MB)
        report.figure(f"{name}: peak RSS growth per byte of body", result["peak"] / len(body), "{:.2f}")
        report.figure(f"{name}: RSS kept after the answer, MiB", result["kept"] / MB)
    hostile_peak = results["hostile"]["peak"] / MB
    report.figure(
        "hostile body: peak growth, MiB",
        hostile_peak,
        target=f"<= {TARGET_HOSTILE_MB}",
        ok=results["hostile"]["status"] == 400 and hostile_peak <= TARGET_HOSTILE_MB,
    )
    return report


def measure_both(session, real: bytes, hostile: bytes) -> dict:
    # The body limit lets the hostile body reach the parser; the value limit is
    # the default that goes with the default body limit (128 MiB).
    with session.web(
        STRINGSIGHT_MAX_REQUEST_BYTES=str(1024 * MB), STRINGSIGHT_MAX_JSON_VALUES=str(128 * 1024 * 30)
    ) as web:
        api = session.api(web)
        (pid,) = [child.pid for child in psutil.Process(web.pid).children()]
        api.expect(api.start(start_body(airline_rows(2))), 201)  # warm: imports, connections
        return {"real": measure(api, pid, real), "hostile": measure(api, pid, hostile)}


if __name__ == "__main__":
    sys.exit(harness.main(run, build_parser()))
