"""POST /api/jobs/estimate/ and /extract/jobs/estimate: what a start body
would cost, validated exactly as a start is, without starting anything or
calling the LLM."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from ..models import JobMode
from ..services import options
from ..services.estimates import job_estimate
from .permissions import JobAPIPermission
from .serializers import ErrorSerializer, StartJobSerializer


class CompletionTokensSerializer(serializers.Serializer):
    expected = serializers.IntegerField(
        allow_null=True, help_text="From the model's recent answers; null without any."
    )
    max = serializers.IntegerField(help_text="max_tokens for every call.")


class CostSerializer(serializers.Serializer):
    low = serializers.FloatField(allow_null=True, help_text="The prompts alone; null without a price.")
    expected = serializers.FloatField(allow_null=True)
    high = serializers.FloatField(allow_null=True, help_text="The prompts and max_tokens for every call.")


class CostByModeSerializer(serializers.Serializer):
    online = CostSerializer(help_text="At the list price: live calls.")
    batch = CostSerializer(help_text="At the batch price: the provider's Batch API.")


class DurationSerializer(serializers.Serializer):
    expected = serializers.FloatField(
        allow_null=True,
        help_text="Seconds, from max_workers, the endpoint's limits and the latency seen recently; "
        "null when no recent latency is known, and in batch mode (the provider answers within its "
        "24 h window).",
    )


class EstimateSerializer(serializers.Serializer):
    rows = serializers.IntegerField(help_text="Rows the job would run (after sample_size).")
    cached_rows = serializers.IntegerField(help_text="Rows answered from the completion cache, at no cost.")
    calls = serializers.IntegerField(help_text="LLM calls: one per row not cached.")
    prompt_tokens = serializers.IntegerField(
        help_text="With the model's own encoding for OpenAI models, else four characters a token."
    )
    completion_tokens = CompletionTokensSerializer()
    mode = serializers.ChoiceField(choices=JobMode.choices, help_text="The start's mode: cost_usd's price.")
    cost_usd = CostSerializer(help_text="At the price of the start's mode.")
    cost_usd_by_mode = CostByModeSerializer(help_text="The same job's cost in each mode.")
    duration_s = DurationSerializer()


class EstimateJobView(APIView):
    permission_classes = [JobAPIPermission]

    @extend_schema(
        operation_id="jobs_estimate",
        summary="What a start body would cost, before starting it (no LLM call)",
        request=StartJobSerializer,
        responses={200: EstimateSerializer, **{code: ErrorSerializer for code in (400, 401, 403, 413, 415)}},
    )
    def post(self, request):
        serializer = StartJobSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        accepted = options.accept_start(serializer.validated_data["request"])
        return Response(
            job_estimate(rows=accepted.rows, params=accepted.params, encoded_rows=accepted.encoded_rows)
        )


class SeedEstimateJobView(EstimateJobView):
    @extend_schema(
        operation_id="extract_jobs_estimate",
        summary="What a start body would cost (StringSight path)",
        request=StartJobSerializer,
        responses={200: EstimateSerializer, **{code: ErrorSerializer for code in (400, 401, 403, 413, 415)}},
    )
    def post(self, request):
        return super().post(request)
