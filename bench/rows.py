"""The rows the benchmarks send, and the extraction spec a job with the
API's defaults runs with."""

from __future__ import annotations

import json
from pathlib import Path

AIRLINE_DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "airline_data_demo.jsonl"


def encode(payload) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()


def start_body(rows: list[dict], **params) -> bytes:
    return encode({"rows": rows, **params})


def default_spec(method: str):
    """The extraction spec our worker builds for a job started with the
    API's defaults, for benchmarks that call the LLM without a job."""
    from django.conf import settings

    from extraction.prompts import resolve_system_prompt
    from jobs.api.serializers import DEFAULTS
    from jobs.models import ExtractJob
    from jobs.worker.engine import WorkerSettings, extraction_spec

    job = ExtractJob(  # never saved: only what extraction_spec reads
        method=method,
        model_name=settings.STRINGSIGHT_DEFAULT_MODEL,
        resolved_system_prompt=resolve_system_prompt(DEFAULTS["system_prompt"], method),
        **{
            name: DEFAULTS[name]
            for name in ("temperature", "top_p", "max_tokens", "include_scores_in_prompt")
        },
    )
    return extraction_spec(job, WorkerSettings.from_django())


def airline_rows(count: int, *, first: int = 0) -> list[dict]:
    """The 100 demo transcripts cycled to `count` rows. Each copy gets its own
    question_id and a line in its prompt, so every row is a distinct LLM
    request: identical rows would be answered from the completion cache."""
    base = [json.loads(line) for line in AIRLINE_DATA.read_text().splitlines() if line.strip()]
    rows = []
    for index in range(first, first + count):
        row = dict(base[index % len(base)])
        row["question_id"] = f"bench-{index:06d}"
        row["prompt"] = f"{row['prompt']}\n\n(benchmark row {index})"
        rows.append(row)
    return rows


FILLER = (
    "The assistant checked the reservation, confirmed the passenger's details and explained the "
    "baggage allowance before offering the cheapest direct flight that met every constraint. "
)


def synthetic_rows(count: int, size: int = 1024) -> list[dict]:
    """Distinct single_model rows of about `size` bytes of JSON each."""
    rows = []
    for index in range(count):
        row = {
            "prompt": f"Question {index}: book the cheapest flight from JFK to SEA on May {index % 28 + 1}.",
            "model": "bench-model",
            "question_id": f"syn-{index:06d}",
            "model_response": "",
        }
        room = size - len(encode(row))
        row["model_response"] = (FILLER * (room // len(FILLER) + 1))[: max(room, 0)]
        rows.append(row)
    return rows


def rows_description(rows: list[dict], kind: str) -> str:
    average = sum(len(encode(row)) for row in rows[:200]) / max(min(len(rows), 200), 1)
    return f"{len(rows):,} {kind} rows (~{average / 1024:,.1f} KB each)"
