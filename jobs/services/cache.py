"""LLM answers shared by every worker, so identical rows are never paid for twice."""

from extraction.extract import RowOutcome

from ..models import (
    CompletionCache,
)


def remember_answers(*, model_name: str, outcomes: list[RowOutcome]) -> None:
    if not outcomes:
        return
    CompletionCache.objects.bulk_create(
        [
            CompletionCache(
                key=outcome.cache_key,
                model_name=model_name,
                answer=outcome.raw_answer,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
            )
            # One entry per key, even when identical rows answered together.
            for outcome in {outcome.cache_key: outcome for outcome in outcomes}.values()
        ],
        update_conflicts=True,
        unique_fields=["key"],
        update_fields=["answer", "prompt_tokens", "completion_tokens", "created_at"],
    )


def cached_answers(*, keys: list[str]) -> dict[str, str]:
    return dict(CompletionCache.objects.filter(key__in=keys).values_list("key", "answer"))
