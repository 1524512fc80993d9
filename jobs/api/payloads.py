"""Response bodies as plain dicts: a job's status is one row read, and a
result is one query over the job's properties in input order."""

from ..models import ExtractJob, JobState

PROPERTY_FIELDS = (
    "id",
    "question_id",
    "row_index",
    "model",
    "property_description",
    "category",
    "reason",
    "evidence",
    "behavior_type",
    "contains_errors",
    "unexpected_behavior",
)


def status_payload(job: ExtractJob) -> dict:
    return {
        "job_id": job.id,
        "state": job.state,
        "progress": job.progress,
        "count_done": job.count_done,
        "count_failed": job.count_failed,
        "count_total": job.count_total,
        "properties_count": job.properties_count,
        "error": job.error or None,
        "method": job.method,
        "model_name": job.model_name,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "cancelled_at": job.cancelled_at,
        "usage": {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.total_tokens,
        },
        "cost_usd": job.cost_usd,
        "cache_hits": job.cache_hits,
        "sample_size": job.sample_size,
        "budget": {"max_cost_usd": job.max_cost_usd, "max_total_tokens": job.max_total_tokens},
    }


def result_payload(job: ExtractJob) -> dict:
    properties = list(job.properties.order_by("row_index", "position").values(*PROPERTY_FIELDS))
    return {
        "job_id": job.id,
        "state": job.state,
        "cancelled": job.state == JobState.CANCELLED,
        "count": len(properties),
        "properties": properties,
    }
