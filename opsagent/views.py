"""Project-level views: the health check."""
from django.core.cache import cache
from django.db import connection
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET


@require_GET
def health(request):
    database = "ok"
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception:
        database = "unavailable"
    cache_state = "ok"
    try:
        cache.set("health:probe", 1, 5)
        if cache.get("health:probe") != 1:
            cache_state = "unavailable"
    except Exception:
        cache_state = "unavailable"
    healthy = database == "ok"
    return JsonResponse(
        {
            "status": "ok" if healthy and cache_state == "ok" else ("degraded" if healthy else "unavailable"),
            "database": database,
            "cache": cache_state,
            "timestamp": timezone.now().isoformat(),
        },
        status=200 if healthy else 503,
    )
