"""What a job is asked to do: its prompts, model, sampling and budgets, as the
start rules (options) settle them and the lifecycle stores them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class JobParams:
    method: str
    system_prompt: str
    resolved_system_prompt: str
    task_description: str
    model_name: str
    temperature: float
    top_p: float
    max_tokens: int
    max_workers: int
    include_scores_in_prompt: bool = False
    sample_size: int | None = None
    use_cache: bool = True
    max_cost_usd: float | None = None
    max_total_tokens: int | None = None
    # online: live calls; batch: the provider's Batch API, at its batch price.
    mode: str = "online"
