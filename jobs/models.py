import json
import uuid

from django.conf import settings
from django.db import models

from extraction.rows import encode_row


class JobState(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


class Method(models.TextChoices):
    SINGLE_MODEL = "single_model"
    SIDE_BY_SIDE = "side_by_side"


class JobKind(models.TextChoices):
    # Rows run by workers, started with /extract/jobs/start or /api/jobs/.
    ROWS = "rows"
    # One row extracted inside a web request (/extract/single), recorded as a
    # job so that its tokens and cost are accounted like any other.
    SINGLE = "single"


class JobMode(models.TextChoices):
    # Live calls, one per row, by the workers' engine.
    ONLINE = "online"
    # The provider's Batch API (/v1/files + /v1/batches): half the price,
    # results within the provider's window (jobs.batchmode).
    BATCH = "batch"


class RowStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ExtractJob(models.Model):
    """One extraction request. Its counters are the status: the worker moves
    them with F() in the same transaction as the row they count, so reading
    a job's progress never counts rows or properties."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="extract_jobs"
    )
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED)
    kind = models.CharField(max_length=16, choices=JobKind.choices, default=JobKind.ROWS)
    mode = models.CharField(
        max_length=8, choices=JobMode.choices, default=JobMode.ONLINE, db_default=JobMode.ONLINE
    )
    error = models.TextField(blank=True, default="")

    method = models.CharField(max_length=16, choices=Method.choices)
    system_prompt = models.TextField(help_text="The prompt name or literal text the caller sent.")
    resolved_system_prompt = models.TextField(help_text="The exact system message sent to the LLM.")
    task_description = models.TextField(blank=True, default="")
    model_name = models.CharField(max_length=200)
    temperature = models.FloatField()
    top_p = models.FloatField()
    max_tokens = models.PositiveIntegerField()
    max_workers = models.PositiveIntegerField()
    include_scores_in_prompt = models.BooleanField(default=False)
    sample_size = models.PositiveIntegerField(null=True, blank=True)
    use_cache = models.BooleanField(default=True)
    max_cost_usd = models.FloatField(null=True, blank=True)
    max_total_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    # USD per million tokens, frozen at start so a job's cost never changes
    # when the price table does. Null: no price known for the model.
    price_input_per_mtok = models.FloatField(null=True, blank=True)
    price_output_per_mtok = models.FloatField(null=True, blank=True)
    # What the job may cost at most, estimated at start (every row's prompt
    # and max_tokens of answer): its share of the owner's daily budget
    # while it runs. Null without a price.
    estimated_cost_usd = models.FloatField(null=True, blank=True)
    # A resume on a later day than the job's start makes its spending count
    # towards that day from then on: when (null: since its start), and what
    # it had cost before, which belongs to an earlier day.
    daily_since = models.DateTimeField(null=True, blank=True)
    daily_cost_before_usd = models.FloatField(default=0.0)

    count_total = models.PositiveIntegerField(default=0)
    count_done = models.PositiveIntegerField(default=0)
    count_failed = models.PositiveIntegerField(default=0)
    properties_count = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cache_hits = models.PositiveIntegerField(default=0)

    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    # When tasks were last enqueued for the job. Unless a worker died on it,
    # the sweep re-enqueues only for a job that has gone a lease period
    # without work or progress.
    work_enqueued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="job_owner_created"),
            models.Index(fields=["state", "-created_at"], name="job_state_created"),
        ]

    def __str__(self) -> str:
        return f"job {self.id} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def count_finished(self) -> int:
        return self.count_done + self.count_failed

    @property
    def progress(self) -> float:
        """Finished rows (done or failed) over all rows, 0..1."""
        if not self.count_total:
            return 0.0
        return min(1.0, self.count_finished / self.count_total)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def has_prices(self) -> bool:
        return self.price_input_per_mtok is not None and self.price_output_per_mtok is not None

    def cost_of(self, prompt_tokens: float, completion_tokens: float) -> float | None:
        if not self.has_prices:
            return None
        return (
            prompt_tokens * self.price_input_per_mtok + completion_tokens * self.price_output_per_mtok
        ) / 1e6

    @property
    def cost_usd(self) -> float | None:
        """Estimated from the tokens used and the prices frozen at start."""
        return self.cost_of(self.prompt_tokens, self.completion_tokens)


class OrderedJSONField(models.TextField):
    """JSON kept as the text it arrived as. PostgreSQL's jsonb reorders an
    object's keys, and a transcript must reach the LLM (and the completion
    cache) exactly as the user sent it, on either database."""

    def from_db_value(self, value, expression, connection):
        return None if value is None else json.loads(value)

    def to_python(self, value):
        return json.loads(value) if isinstance(value, str) else value

    def get_prep_value(self, value):
        return None if value is None else encode_row(value)


class ProviderBatchState(models.TextChoices):
    """Ours, not the provider's: how far the batch's record got. Each step
    is stored before the provider call that the next one needs."""

    PREPARING = "preparing"  # rows linked; nothing uploaded yet
    UPLOADED = "uploaded"  # input file at the provider; no batch created yet
    SUBMITTED = "submitted"  # batch created at the provider
    IMPORTED = "imported"  # every line of its output and error files recorded
    ABANDONED = "abandoned"  # never created (cancelled before), or given up


class ProviderBatch(models.Model):
    """One provider batch of a job. Written before each provider call that
    creates something, so a killed worker leaves nothing orphaned."""

    # Sent as the batch's metadata {"stringsight_batch": str(id)}, so a batch
    # created by a worker killed before it stored batch_id can be found.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    job = models.ForeignKey(ExtractJob, on_delete=models.CASCADE, related_name="provider_batches")
    # 1 = first send; 2.. = re-sends of failed or expired lines.
    attempt = models.PositiveSmallIntegerField(default=1)
    state = models.CharField(max_length=16, choices=ProviderBatchState.choices)
    input_file_id = models.CharField(max_length=200, blank=True, default="")
    batch_id = models.CharField(max_length=200, blank=True, default="")
    provider_status = models.CharField(max_length=32, blank=True, default="")
    # The provider's {total, completed, failed}.
    request_counts = models.JSONField(default=dict)
    output_file_id = models.CharField(max_length=200, blank=True, default="")
    error_file_id = models.CharField(max_length=200, blank=True, default="")
    cancel_requested = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["job_id", "created_at"]
        verbose_name_plural = "provider batches"

    def __str__(self) -> str:
        return f"batch {self.batch_id or self.id} of job {self.job_id} ({self.state})"


class ExtractRow(models.Model):
    job = models.ForeignKey(ExtractJob, on_delete=models.CASCADE, related_name="rows")
    index = models.PositiveIntegerField()
    # The caller's own index of the row: its `__index` when it sent one, else
    # its position in the request (which differs from `index` after sampling).
    # Null for rows stored before it was recorded.
    input_index = models.PositiveIntegerField(null=True, blank=True)
    question_id = models.CharField(max_length=200)
    data = OrderedJSONField()
    status = models.CharField(
        max_length=16, choices=RowStatus.choices, default=RowStatus.PENDING, db_default=RowStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0, db_default=0, help_text="LLM calls made for this row.")
    error = models.TextField(blank=True, default="", db_default="")
    raw_answer = models.TextField(blank=True, default="", db_default="")
    properties_dropped = models.PositiveIntegerField(default=0, db_default=0)
    cached = models.BooleanField(
        default=False, db_default=False, help_text="The answer came from the completion cache."
    )
    prompt_tokens = models.PositiveIntegerField(default=0, db_default=0)
    completion_tokens = models.PositiveIntegerField(default=0, db_default=0)
    # What a budgeted job's claim set aside for this row's calls (its prompt
    # and max_tokens of answer, for each ask): counted against the budget
    # while the row is running, so calls in flight cannot overspend it. A
    # database default: rows are inserted by SQL that names its columns.
    reserved_prompt_tokens = models.PositiveIntegerField(default=0, db_default=0)
    reserved_completion_tokens = models.PositiveIntegerField(default=0, db_default=0)
    claimed_by = models.CharField(
        max_length=150,
        blank=True,
        default="",
        db_default="",
        help_text="The worker that holds or last held the row.",
    )
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    lease_expiries = models.PositiveSmallIntegerField(
        default=0,
        db_default=0,
        help_text="Times a worker died (its lease ran out) while extracting this row.",
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # In batch mode, the provider batch that last sent the row.
    provider_batch = models.ForeignKey(
        ProviderBatch, null=True, blank=True, on_delete=models.SET_NULL, related_name="rows"
    )

    class Meta:
        ordering = ["job_id", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="row_unique_job_index")]
        indexes = [
            # Claims take the lowest pending indexes; the cap counts running rows.
            models.Index(fields=["job", "status", "index"], name="row_job_status_index"),
            # The sweep looks for running rows whose lease ran out, across all jobs.
            models.Index(
                fields=["lease_expires_at"], condition=models.Q(status="running"), name="row_running_lease"
            ),
        ]

    def __str__(self) -> str:
        return f"row {self.index} of job {self.job_id} ({self.status})"


# What an extracted property says (facts §2), in the order every output
# (API, exports) lists it; evidence last, as exports append it as JSON text.
PROPERTY_CONTENT = (
    "question_id",
    "model",
    "property_description",
    "category",
    "reason",
    "behavior_type",
    "contains_errors",
    "unexpected_behavior",
    "evidence",
)


class Property(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    job = models.ForeignKey(ExtractJob, on_delete=models.CASCADE, related_name="properties")
    row = models.ForeignKey(ExtractRow, on_delete=models.CASCADE, related_name="properties")
    # Denormalised from the row so a job's properties list in input order
    # from one index, without a join.
    row_index = models.PositiveIntegerField()
    # The row's input_index, denormalised the same way; null (read as
    # row_index) for properties stored before it was recorded.
    input_index = models.PositiveIntegerField(null=True, blank=True)
    position = models.PositiveSmallIntegerField()
    question_id = models.CharField(max_length=200)
    model = models.CharField(max_length=200)
    property_description = models.TextField()
    category = models.CharField(max_length=200, blank=True, default="")
    reason = models.TextField(blank=True, default="")
    evidence = models.JSONField(default=list)
    behavior_type = models.CharField(max_length=32)
    contains_errors = models.BooleanField(default=False)
    unexpected_behavior = models.BooleanField(default=False)

    class Meta:
        verbose_name_plural = "properties"
        ordering = ["job_id", "row_index", "position"]
        constraints = [
            # A row's properties are stored once, however often its answer arrives.
            models.UniqueConstraint(fields=["row", "position"], name="property_unique_row_position"),
        ]
        indexes = [models.Index(fields=["job", "row_index", "position"], name="property_job_order")]

    def __str__(self) -> str:
        return self.property_description[:80]


class WorkerSlots(models.Model):
    """How many of a job's max_workers LLM calls one worker may have in
    flight, and how many it had at its last heartbeat. The grants of a
    job's workers never add up to more than its max_workers: a worker
    raises its own only with the job row locked, and starts no call beyond
    it (see grants.set_slots)."""

    job = models.ForeignKey(ExtractJob, on_delete=models.CASCADE, related_name="worker_slots")
    worker_id = models.CharField(max_length=150)
    slots = models.PositiveIntegerField(default=0)
    in_flight = models.PositiveIntegerField(default=0, db_default=0)
    # False once the worker has no rows left to call: its share goes to the others.
    wants = models.BooleanField(default=True)
    # A grant not renewed for a lease period belongs to a dead worker.
    renewed_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "worker_id"], name="slots_job_worker")]

    def __str__(self) -> str:
        return f"{self.worker_id}: {self.slots} slots"


class CompletionCache(models.Model):
    """LLM answers shared by every worker, keyed by endpoint, model, messages
    and sampling parameters, so identical rows are never paid for twice."""

    key = models.CharField(max_length=64, primary_key=True)
    model_name = models.CharField(max_length=200)
    answer = models.TextField()
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "cached completion"

    def __str__(self) -> str:
        return f"{self.model_name} {self.key[:12]}"


class Heartbeat(models.Model):
    """When a worker last ran the periodic sweep: the health endpoint's
    sign that some worker is alive and not buried under a backlog."""

    name = models.CharField(max_length=50, primary_key=True)
    at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} at {self.at:%Y-%m-%d %H:%M:%S}"


class ThrottleBucket(models.Model):
    """An allowance of requests for one caller in one scope (job starts, admin
    login failures), kept in the database so every web process shares it.
    `tat` is the generic cell rate algorithm's theoretical arrival time in
    epoch seconds: taking from the allowance is one conditional UPDATE, so
    parallel requests cannot all read the same count and pass."""

    scope = models.CharField(max_length=32)
    ident = models.CharField(max_length=300)
    tat = models.FloatField(default=0.0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "ident"], name="throttle_scope_ident")]

    def __str__(self) -> str:
        return f"{self.scope} {self.ident}"


class IdempotencyKey(models.Model):
    """A start's Idempotency-Key: the same owner sending the same key again
    (a client retrying after a network error) gets the job it started and
    the answer it was given, not a second job. Kept 24 hours."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    key = models.CharField(max_length=255)
    # SHA-256 of the start request (its media type and raw body): the same
    # key with another body is a client's mistake, answered 409.
    request_hash = models.CharField(max_length=64)
    job = models.ForeignKey(ExtractJob, on_delete=models.CASCADE, related_name="+")
    # The start's response body (JSON text), given again on every replay.
    answer = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            # One start per key and owner, whatever the concurrency: a
            # second INSERT fails and that start answers with the first's job.
            models.UniqueConstraint(
                fields=["owner", "key"], condition=models.Q(owner__isnull=False), name="idempotency_owner_key"
            ),
            # Anonymous callers (anonymous mode) share one scope, as they share jobs.
            models.UniqueConstraint(
                fields=["key"], condition=models.Q(owner__isnull=True), name="idempotency_anonymous_key"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.key[:40]} → job {self.job_id}"


class ProviderEndpoint(models.Model):
    """The shared state of one LLM endpoint lane (a base URL and key, hashed,
    and a model where limits are set per model): the calls it allows in
    flight as adapted to its refusals, a pause every caller keeps, and the
    request and token rates' GCRA arrival times (epoch seconds). Rows are
    locked only by provider_limits.settle, briefly."""

    key = models.CharField(max_length=300, primary_key=True)
    allowed = models.FloatField(null=True, blank=True)
    slow_start = models.BooleanField(default=True)
    decreased_at = models.FloatField(default=0.0)
    paused_until = models.FloatField(default=0.0)
    request_tat = models.FloatField(default=0.0)
    token_tat = models.FloatField(default=0.0)

    def __str__(self) -> str:
        return self.key


class ProviderLease(models.Model):
    """One worker process's part of an endpoint lane's calls in flight:
    renewed while it calls; one not renewed for a lease period is a dead
    process's and no longer counts."""

    endpoint = models.ForeignKey(ProviderEndpoint, on_delete=models.CASCADE, related_name="leases")
    holder = models.CharField(max_length=64)
    held = models.PositiveIntegerField(default=0)
    wants = models.PositiveIntegerField(default=0)
    in_flight = models.PositiveIntegerField(default=0)
    renewed_at = models.FloatField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["endpoint", "holder"], name="lease_endpoint_holder")]

    def __str__(self) -> str:
        return f"{self.holder}: {self.held} of {self.endpoint_id}"
