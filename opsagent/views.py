"""Project-level views: the health check and the Prometheus metrics."""
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from opsagent.common.dependencies import dependency_states
from opsagent.common.metrics import metrics_refusal, metrics_response


@require_GET
def health(request):
    """200 when the service can answer: every dependency it needs is reachable (the database, and the cache, which
    is Redis with REDIS_URL, where stop requests travel too). 503 otherwise: the requests that need a dependency that
    is down get 503s too."""
    checks = dependency_states()
    healthy = all(state == "ok" for state in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", **checks, "timestamp": timezone.now().isoformat()},
        status=200 if healthy else 503,
    )


@require_GET
def metrics(request):
    """The Prometheus metrics in the text format, for a scraper with METRICS_TOKEN or on this host."""
    return metrics_refusal(request) or metrics_response()
