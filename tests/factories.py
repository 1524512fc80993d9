"""Small builders for jobs and rows used across the tests."""

from extraction.extract import RowOutcome
from jobs.services import claims, lifecycle
from jobs.services.lifecycle import JobParams
from jobs.services.sql import ClaimedRow

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
