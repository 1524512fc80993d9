"""GET /healthz: is the database reachable, and how long ago did a worker
last show a sign of life (some worker sweeps every STRINGSIGHT_SWEEP_SECONDS,
5 s by default). For load balancers: 200 while the database answers, 503
when it does not; `?require_worker=1` also answers 503 when no worker has
been seen for WORKER_STALE_SECONDS."""

from django.db import DatabaseError, connection
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from .models import Heartbeat

# Every worker process offers to sweep every few seconds: a minute without
# a sweep means no worker is running (or none reaches the database).
WORKER_STALE_SECONDS = 60


@require_GET
def healthz(request):
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        beat = Heartbeat.objects.filter(name="sweep").values_list("at", flat=True).first()
    except DatabaseError as exc:
        return JsonResponse({"status": "down", "database": f"unreachable: {type(exc).__name__}"}, status=503)
    age = (timezone.now() - beat).total_seconds() if beat else None
    worker_ok = age is not None and age <= WORKER_STALE_SECONDS
    body = {
        "status": "ok" if worker_ok else "degraded",
        "database": "ok",
        "worker": {"heartbeat_age_seconds": None if age is None else round(age, 1), "ok": worker_ok},
    }
    failing = request.GET.get("require_worker") in ("1", "true") and not worker_ok
    return JsonResponse(body, status=503 if failing else 200)
