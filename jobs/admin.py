"""The staff admin. Nothing here edits a job: the pages are read-only, and a
cancel goes through `lifecycle.job_cancel`, as the API's does. On a job the
change permission is the right to cancel it."""

import math
import uuid

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import quote, unquote
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import F
from django.http import Http404, HttpResponseRedirect, JsonResponse, StreamingHttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.views.decorators.http import require_GET, require_POST

from . import exports, presenter
from .api.throttling import client_address
from .formatting import format_cost, format_duration, job_id_search
from .models import ExtractJob, ExtractRow, JobMode, JobState, Property, ProviderBatch
from .services import access, grants, lifecycle, standing, throttle


class LimitedAdminLoginForm(AdminAuthenticationForm):
    """The admin's sign-in, with failures limited per username and address
    (STRINGSIGHT_ADMIN_LOGIN_RATE, counted like the start throttle): past
    the limit even the right password is refused until the wait is over,
    so a password cannot be guessed at speed."""

    def clean(self):
        rate = throttle.Rate.parse(settings.STRINGSIGHT_ADMIN_LOGIN_RATE)
        # The form does not hold the name to its column's length, and no
        # account's name is longer: the rest would overflow the bucket's.
        longest = self.username_field.max_length or 254
        username = (self.cleaned_data.get("username") or "")[:longest].lower()
        ident = f"{username}|{client_address(self.request)}"
        wait = throttle.throttle_wait(scope="admin_login", ident=ident, rate=rate)
        if wait is not None:
            raise ValidationError(
                f"Too many failed sign-ins for this username from your address: try again in "
                f"{math.ceil(wait / 60)} minute{'s' if wait > 60 else ''}.",
                code="too_many_attempts",
            )
        try:
            return super().clean()
        except ValidationError:
            throttle.throttle_take(scope="admin_login", ident=ident, rate=rate)
            raise


admin.site.login_form = LimitedAdminLoginForm

STATE_COLOURS = {
    JobState.QUEUED: "#6c757d",
    JobState.RUNNING: "#0d6efd",
    JobState.DONE: "#198754",
    JobState.ERROR: "#dc3545",
    JobState.CANCELLED: "#fd7e14",
}
ROWS_PER_PAGE = 50
ROW_FIELDS = ("index", "question_id", "status", "attempts", "error")
PROGRESS_FIELDS = ("state", "count_done", "count_failed", "count_total", "properties_count")


def state_badge(state: str):
    return format_html(
        '<span class="job-state" style="background-color: {}">{}</span>', STATE_COLOURS[state], state
    )


def progress_bar(job: ExtractJob):
    return format_html(
        '<div class="job-progress" title="{}%"><div class="job-progress-bar" style="width: {}%"></div></div>'
        '<span class="job-counts">{} done, {} failed of {}</span>',
        round(job.progress * 100),
        f"{job.progress * 100:.1f}",
        job.count_done,
        job.count_failed,
        job.count_total,
    )


class JobFilter(admin.SimpleListFilter):
    """Filters by one job (`?job=<id>`, as the job page links) without
    listing every job as a choice."""

    title = "job"
    parameter_name = "job"

    def lookups(self, request, model_admin):
        job_id = self.value()
        return [(job_id, job_id[:8])] if job_id else []

    def has_output(self):
        # A filter without output is not applied, so this one has output while it is in use.
        return self.value() is not None

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        try:
            job_id = uuid.UUID(self.value())
        except ValueError:
            raise IncorrectLookupParameters(f"{self.value()!r} is not a job id") from None
        return queryset.filter(job_id=job_id)


class ReadOnlyAdmin(admin.ModelAdmin):
    """View-only pages: state and counters change only through the services.
    Seeing needs the view permission itself, as in the API (Django's admin
    lets the change permission see too); a job's rows and properties also
    need the permission to see jobs."""

    def has_view_permission(self, request, obj=None):
        opts = self.opts
        own = request.user.has_perm(f"{opts.app_label}.{get_permission_codename('view', opts)}")
        return own and (opts.model is ExtractJob or request.user.has_perm("jobs.view_extractjob"))

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ExtractJob)
class ExtractJobAdmin(ReadOnlyAdmin):
    list_display = (
        "short_id",
        "owner",
        "kind",
        "mode",
        "state_badge",
        "progress",
        "queue_or_calls",
        "properties",
        "tokens",
        "cost",
        "model_name",
        "created_at",
        "duration",
    )
    list_filter = (
        "state",
        "kind",
        "mode",
        "model_name",
        ("owner", admin.RelatedOnlyFieldListFilter),
        "created_at",
    )
    list_select_related = ("owner",)
    search_fields = ("owner__username",)
    search_help_text = "A job id (or its first digits) or an owner's username."
    ordering = ("-created_at",)
    actions = ["cancel_jobs", "export_csv", "export_jsonl"]
    fieldsets = (
        ("Job", {"fields": ("id", "owner", "kind", "mode", "state_badge", "error", "method", "model_name")}),
        ("Usage", {"fields": ("prompt_tokens", "completion_tokens", "tokens", "cost", "cache_hits")}),
        (
            "Parameters",
            {
                "fields": (
                    "system_prompt",
                    "resolved_system_prompt",
                    "task_description",
                    "temperature",
                    "top_p",
                    "max_tokens",
                    "max_workers",
                    "include_scores_in_prompt",
                    "sample_size",
                    "use_cache",
                    "max_cost_usd",
                    "max_total_tokens",
                    "price_input_per_mtok",
                    "price_output_per_mtok",
                )
            },
        ),
        ("Timestamps", {"fields": ("created_at", "started_at", "finished_at", "cancelled_at", "duration")}),
    )

    def has_cancel_permission(self, request, obj=None):
        codename = get_permission_codename("change", self.opts)
        may_cancel = self.has_view_permission(request) and request.user.has_perm(
            f"{self.opts.app_label}.{codename}"
        )
        return may_cancel and (obj is None or access.may_change(request.user, obj))

    def get_queryset(self, request):
        # The jobs the API shows this user: with the view permission, everyone's.
        jobs = super().get_queryset(request).filter(pk__in=access.jobs_visible_to(request.user).values("pk"))
        return standing.with_standing(jobs)

    @admin.display(description="id", ordering="id")
    def short_id(self, job):
        # The whole id in the tooltip; its first digits are enough to search by.
        return format_html('<span class="job-id" title="{}">{}</span>', job.pk, str(job.pk)[:8])

    @admin.display(description="state", ordering="state")
    def state_badge(self, job):
        return state_badge(job.state)

    @admin.display(description="progress")
    def progress(self, job):
        return progress_bar(job)

    @admin.display(description="queue / calls")
    def queue_or_calls(self, job):
        """A queued job's place (the queued jobs ahead of it), a running
        job's LLM calls in flight."""
        if job.state == JobState.QUEUED:
            return f"{standing.queue_position(job)} ahead"
        if job.state == JobState.RUNNING:
            calls = standing.calls_in_flight(job)
            return f"{calls} call{'' if calls == 1 else 's'}"
        return "—"

    @admin.display(description="properties", ordering="properties_count")
    def properties(self, job):
        return format_html('<a href="{}">{}</a>', properties_url(job), job.properties_count)

    @admin.display(description="tokens", ordering=F("prompt_tokens") + F("completion_tokens"))
    def tokens(self, job):
        return f"{job.total_tokens:,}"

    @admin.display(description="cost")
    def cost(self, job):
        return format_cost(job.cost_usd)

    @admin.display(description="duration")
    def duration(self, job):
        if job.started_at is None:
            return "—"
        return format_duration((job.finished_at or timezone.now()) - job.started_at)

    def get_search_results(self, request, queryset, search_term):
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        by_id = job_id_search(search_term)
        if by_id is not None:
            results |= queryset.filter(by_id)
        return results, may_have_duplicates

    @admin.action(description="Cancel selected jobs", permissions=["cancel"])
    def cancel_jobs(self, request, queryset):
        outcomes = [lifecycle.job_cancel(job=job) for job in queryset if access.may_change(request.user, job)]
        cancelled = sum(outcome.cancelled_now for outcome in outcomes)
        self.message_user(
            request,
            f"{cancelled} {'job' if cancelled == 1 else 'jobs'} cancelled; "
            f"{len(outcomes) - cancelled} already finished.",
            messages.SUCCESS if cancelled else messages.WARNING,
        )

    @admin.action(description="Export properties as CSV")
    def export_csv(self, request, queryset):
        return properties_download(queryset, "csv")

    @admin.action(description="Export properties as JSONL")
    def export_jsonl(self, request, queryset):
        return properties_download(queryset, "jsonl")

    def changelist_view(self, request, extra_context=None):
        """The job list, and below it the workers alive with their calls in
        flight and each running job's share of them."""
        return super().changelist_view(
            request, {"workers": grants.workers_at_work(), **(extra_context or {})}
        )

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<path:object_id>/cancel/",
                self.admin_site.admin_view(self.cancel_view),
                name="{}_{}_cancel".format(*info),
            ),
            path(
                "<path:object_id>/progress/",
                self.admin_site.admin_view(self.progress_view),
                name="{}_{}_progress".format(*info),
            ),
            *super().get_urls(),
        ]

    def find_job(self, request, object_id, *fields: str) -> ExtractJob:
        jobs = self.get_queryset(request)
        try:
            return (jobs.only(*fields) if fields else jobs).get(pk=uuid.UUID(unquote(object_id)))
        except (ValueError, ExtractJob.DoesNotExist):
            raise Http404(f"no job {object_id}") from None

    @method_decorator(require_POST)
    def cancel_view(self, request, object_id):
        if not self.has_cancel_permission(request):
            raise PermissionDenied
        job = self.find_job(request, object_id)
        if not self.has_cancel_permission(request, job):
            raise PermissionDenied
        outcome = lifecycle.job_cancel(job=job)
        if outcome.cancelled_now:
            self.message_user(
                request, f"Job cancelled; {outcome.job.properties_count} properties kept.", messages.SUCCESS
            )
        else:
            self.message_user(
                request, f"Job already finished (state: {outcome.job.state}).", messages.WARNING
            )
        return HttpResponseRedirect(reverse("admin:jobs_extractjob_change", args=[quote(job.pk)]))

    @method_decorator(require_GET)
    def progress_view(self, request, object_id):
        if not self.has_view_permission(request):
            raise PermissionDenied
        job = self.find_job(request, object_id, *PROGRESS_FIELDS)
        return JsonResponse(
            {**{field: getattr(job, field) for field in PROGRESS_FIELDS}, "progress": job.progress}
        )

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context.update(self.job_page_context(request, obj))
        return super().render_change_form(
            request, context, add=add, change=change, form_url=form_url, obj=obj
        )

    def job_page_context(self, request, job: ExtractJob) -> dict:
        # Only the page's rows, and only their small columns: a job can have
        # tens of thousands of rows, each with its transcript and raw answer.
        rows = ExtractRow.objects.filter(job=job).order_by("index").values(*ROW_FIELDS)
        pk = quote(job.pk)
        return {
            "job": job,
            "state_colour": STATE_COLOURS[job.state],
            "state_colours": STATE_COLOURS,
            "progress_percent": f"{job.progress * 100:.1f}",
            "can_cancel": job.is_active and self.has_cancel_permission(request, job),
            "cancel_url": reverse("admin:jobs_extractjob_cancel", args=[pk]),
            "progress_url": reverse("admin:jobs_extractjob_progress", args=[pk]),
            "properties_url": properties_url(job),
            "rows_page": Paginator(rows, ROWS_PER_PAGE).get_page(request.GET.get("rows_page")),
            **self.provider_batches_context(job),
        }

    @staticmethod
    def provider_batches_context(job: ExtractJob) -> dict:
        """A batch-mode job's batches, each as the provider reports it and
        as far as our record of it got; the status's pending flag."""
        if job.mode != JobMode.BATCH:
            return {}
        batches = list(ProviderBatch.objects.filter(job_id=job.pk).order_by("created_at", "attempt"))
        return {
            "provider_batches": [
                {
                    "id": batch.batch_id or "—",
                    "attempt": batch.attempt,
                    "state": batch.state,
                    "status": batch.provider_status or "—",
                    "counts": presenter.REQUEST_COUNTS.of(batch.request_counts or {}),
                    "created_at": batch.created_at,
                }
                for batch in batches
            ],
            "pending_provider_results": any(presenter.holds_results(batch) for batch in batches),
        }


def properties_url(job: ExtractJob) -> str:
    return f"{reverse('admin:jobs_property_changelist')}?job={job.pk}"


def properties_download(jobs, export_format: str) -> StreamingHttpResponse:
    records = exports.export_records(Property.objects.filter(job__in=jobs.values("pk")), export_format)
    response = StreamingHttpResponse(
        exports.TEXT_WRITERS[export_format](records), content_type=exports.CONTENT_TYPES[export_format]
    )
    filename = f"properties-{timezone.now():%Y%m%d-%H%M%S}.{export_format}"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@admin.register(ExtractRow)
class ExtractRowAdmin(ReadOnlyAdmin):
    list_display = ("job", "index", "question_id", "status", "attempts", "error")
    list_filter = ("status", JobFilter)
    list_select_related = ("job",)
    search_fields = ("question_id",)
    exclude = ("data",)

    def get_queryset(self, request):
        # The transcript and the raw answer can be large; the page loads
        # raw_answer only when a row is opened.
        return super().get_queryset(request).defer("data", "raw_answer")


@admin.register(Property)
class PropertyAdmin(ReadOnlyAdmin):
    list_display = ("property_description", "behavior_type", "category", "model", "question_id", "job")
    list_filter = ("behavior_type", "category", "model", JobFilter)
    search_fields = ("property_description",)
    list_select_related = ("job",)
