"""Small builders for jobs and rows used across the tests, a worker run in
the test's process, and a reader of the export files."""

import io
import json
import threading

import pandas as pd
from django.db import connection

from extraction.extract import RowOutcome
from jobs import exports
from jobs.models import ProviderBatch, ProviderBatchState
from jobs.services import claims, lifecycle
from jobs.services.params import JobParams
from jobs.services.sql import ClaimedRow
from jobs.worker.engine import Engine, WorkerSettings

PROMPT = "You are a careful assistant."


def simple_rows(count: int, *, marker: str = "") -> list[dict]:
    return [
        {
            "prompt": f"Question {index}: what is {index} + {index}? {marker}".strip(),
            "model": "demo-model",
            "model_response": f"The answer is {index * 2}. I double-checked it.",
            "question_id": f"q{index}",
        }
        for index in range(count)
    ]


def pair_side_by_side(rows: list[dict]) -> list[dict]:
    """Pair single_model rows by prompt: the first two models seen answer as A and B, in file order."""
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        answers = by_prompt.setdefault(str(row["prompt"]), [])
        if len(answers) < 2 and all(answer["model"] != row["model"] for answer in answers):
            answers.append(row)
    paired = []
    for prompt, answers in by_prompt.items():
        if len(answers) < 2:
            continue
        row_a, row_b = answers
        pair = {
            "prompt": prompt,
            "model_a": row_a["model"],
            "model_b": row_b["model"],
            "model_a_response": row_a["model_response"],
            "model_b_response": row_b["model_response"],
        }
        if row_a.get("question_id") is not None:
            pair["question_id"] = row_a["question_id"]
        if row_a.get("score") is not None:
            pair["score_a"] = row_a["score"]
        if row_b.get("score") is not None:
            pair["score_b"] = row_b["score"]
        paired.append(pair)
    return paired


def job_params(**overrides) -> JobParams:
    values = {
        "method": "single_model",
        "system_prompt": "custom",
        "resolved_system_prompt": PROMPT,
        "task_description": "",
        "model_name": "sim-model",
        "temperature": 0.6,
        "top_p": 0.95,
        "max_tokens": 2048,
        "max_workers": 8,
        "include_scores_in_prompt": False,
    }
    values.update(overrides)
    return JobParams(**values)


def make_job(owner, rows=None, **params):
    return lifecycle.job_start(
        owner=owner, rows=rows if rows is not None else simple_rows(3), params=job_params(**params)
    )


def provider_batch(job, *, created_at=None, **fields) -> ProviderBatch:
    """A record of one of the job's batches at the provider, as the batch
    mode's worker writes it (submitted, by default); `created_at` orders it."""
    batch = ProviderBatch.objects.create(job=job, **{"state": ProviderBatchState.SUBMITTED, **fields})
    if created_at is not None:
        ProviderBatch.objects.filter(pk=batch.pk).update(created_at=created_at)
        batch.refresh_from_db()
    return batch


def property_dict(description: str = "Gives the right answer.", **overrides) -> dict:
    values = {
        "property_description": description,
        "category": "Correctness",
        "reason": "Users need correct answers.",
        "evidence": ["The answer is 2."],
        "behavior_type": "Positive",
        "contains_errors": False,
        "unexpected_behavior": False,
        "model": "demo-model",
        "question_id": "q0",
    }
    values.update(overrides)
    return values


def done_outcome(count: int = 2, **overrides) -> RowOutcome:
    values = {
        "properties": [property_dict(f"Behaviour {n}.") for n in range(count)],
        "raw_answer": "[...]",
        "prompt_tokens": 100,
        "completion_tokens": 40,
        "attempts": 1,
    }
    values.update(overrides)
    return RowOutcome(**values)


def record_row_result(
    *, job_id, row_id: int, row_index: int, worker_id: str, outcome: RowOutcome, model_name: str = ""
) -> bool:
    """One row's outcome as a worker records it; False when it was discarded."""
    row = ClaimedRow(id=row_id, index=row_index, question_id="", data={})
    recorded = claims.record_row_results(
        job_id=job_id, worker_id=worker_id, results=[(row, outcome)], model_name=model_name
    )
    return recorded.stored == 1


# A worker's settings for the tests: quick polls and retries, the simulator's key.
WORKER_SETTINGS = {
    "poll_seconds": 0.05,
    "lease_seconds": 60,
    "api_key": "sim-key",
    "llm_timeout": 10.0,
    "max_attempts": 3,
    "retry_base": 0.01,
    "retry_max": 0.05,
    "structured_output": True,
}


def run_job(job_id, **settings) -> str:
    """Run the job in this process as a worker serving only it would, until
    it is done or stops running; `settings` override WORKER_SETTINGS and
    must name the LLM's `base_url` (the simulator's). Returns why the
    worker stopped."""
    lifecycle.job_mark_running(job_id=job_id)
    return Engine(WorkerSettings(**{**WORKER_SETTINGS, **settings}), job_id=job_id).run()


def run_at_once(job_id, *, runners: int = 2, meanwhile=None, **settings) -> None:
    """run_job on several threads at once (each with its own connection), as
    several worker processes would; `meanwhile` runs on this thread while
    they work."""

    def run():
        try:
            run_job(job_id, **settings)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(runners)]
    for thread in threads:
        thread.start()
    if meanwhile is not None:
        meanwhile()
    for thread in threads:
        thread.join()


def parquet_bytes(records) -> bytes:
    return b"".join(exports.parquet_chunks(records))


def read_export(data: bytes, export_format: str) -> pd.DataFrame:
    """An export file as a frame, as a client would read it back."""
    if export_format == "jsonl":
        return pd.read_json(io.BytesIO(data), lines=True, dtype={"question_id": str})
    if export_format == "csv":
        frame = pd.read_csv(io.BytesIO(data), dtype={"question_id": str}, keep_default_na=False)
        for column in frame.columns:
            if not pd.api.types.is_numeric_dtype(frame[column]):
                frame[column] = frame[column].map(_csv_unescape)
        frame["evidence"] = frame["evidence"].map(json.loads)
        return frame
    return pd.read_parquet(io.BytesIO(data))


def _csv_unescape(value):
    # A value the export escaped is one whose escape gives it back.
    if isinstance(value, str) and value.startswith("'") and exports.csv_safe(value[1:]) == value:
        return value[1:]
    return value
