"""Run chosen benchmarks one after another, on one database kind per process
(each benchmark still gets a fresh database), and print every table.

    python bench/run_all.py --db sqlite|postgres|both [--only 1,2,7] [--smoke]

Sizes are each script's defaults (or its smoke sizes); run a script on its
own to choose them.
"""

import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    b0_simulator,
    b1_throughput,
    b2_orchestration,
    b3_cancel,
    b4_status_export,
    b5_start,
    b6_worker_memory,
    b7_naive,
    b8_recovery,
    b9_faults,
    b10_body_memory,
    b11_fairness,
    b12_provider_limits,
    b13_batch,
    harness,
)

BENCHMARKS = {
    "0": b0_simulator,
    "1": b1_throughput,
    "2": b2_orchestration,
    "3": b3_cancel,
    "4": b4_status_export,
    "5": b5_start,
    "6": b6_worker_memory,
    "7": b7_naive,
    "8": b8_recovery,
    "9": b9_faults,
    "10": b10_body_memory,
    "11": b11_fairness,
    "12": b12_provider_limits,
    "13": b13_batch,
}


def build_parser():
    parser = harness.build_parser(__doc__)
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated numbers out of {','.join(BENCHMARKS)}"
    )
    return parser


def chosen(only: str) -> list[str]:
    keys = [key.strip().lstrip("b") for key in only.split(",") if key.strip()]
    unknown = [key for key in keys if key not in BENCHMARKS]
    if unknown:
        raise SystemExit(
            f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {','.join(BENCHMARKS)}"
        )
    return keys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    keys = chosen(args.only)
    if args.db == "both":
        return harness.run_each_database(__file__, argv)
    harness.stop_on_sigterm()
    shared = harness.without_option(argv, "--only")
    summary = []
    with harness.Session(args) as session:
        for key in keys:
            module = BENCHMARKS[key]
            started = time.monotonic()
            try:
                report = module.run(session, module.build_parser().parse_args(shared))
            except Exception:
                traceback.print_exc()
                summary.append((key, "FAILED to run", time.monotonic() - started))
                continue
            report.print()
            missed = report.missed if not args.smoke else []
            summary.append(
                (key, f"missed: {', '.join(missed)}" if missed else "ran", time.monotonic() - started)
            )
    print(f"### summary ({args.db}{', smoke' if args.smoke else ''})")
    for key, outcome, seconds in summary:
        print(f"- #{key} {BENCHMARKS[key].__name__.rsplit('.', 1)[-1]}: {outcome} ({seconds:.1f} s)")
    return 1 if any(outcome.startswith("FAILED") for _, outcome, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
