from django.contrib import admin, messages

from . import services
from .models import ExtractJob, ExtractRow, Property


class ReadOnlyAdmin(admin.ModelAdmin):
    """State and counters change only through the services."""

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]


@admin.register(ExtractJob)
class ExtractJobAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "owner",
        "state",
        "count_done",
        "count_failed",
        "count_total",
        "properties_count",
        "model_name",
        "created_at",
    )
    list_filter = ("state", "model_name", "created_at")
    list_select_related = ("owner",)
    search_fields = ("id", "owner__username")
    actions = ["cancel_jobs"]

    @admin.action(description="Cancel selected jobs", permissions=["change"])
    def cancel_jobs(self, request, queryset):
        outcomes = [services.job_cancel(job=job) for job in queryset]
        cancelled = sum(outcome.cancelled_now for outcome in outcomes)
        self.message_user(
            request,
            f"{cancelled} job(s) cancelled; {len(outcomes) - cancelled} already finished or cancelled.",
            messages.SUCCESS,
        )


@admin.register(ExtractRow)
class ExtractRowAdmin(ReadOnlyAdmin):
    list_display = ("job", "index", "question_id", "status", "attempts", "error")
    list_filter = ("status",)
    list_select_related = ("job",)
    exclude = ("data",)


@admin.register(Property)
class PropertyAdmin(ReadOnlyAdmin):
    list_display = ("property_description", "behavior_type", "category", "model", "question_id", "job")
    list_filter = ("behavior_type", "model")
    search_fields = ("property_description",)
    list_select_related = ("job",)
