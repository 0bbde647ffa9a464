"""Project-level views: the health check."""
from django.core.cache import cache
from django.db import connection
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from opsagent.common.dependencies import dependency_down


def _state(check) -> str:
    """"ok", or "unavailable" when the check fails because the dependency is down (known down: at once)."""
    try:
        return "ok" if check() else "unavailable"
    except Exception as exc:  # a server down, or a SQLite file that cannot be opened: unusable all the same
        dependency_down(exc)  # a server found down fails the requests that need it at once from now on
        return "unavailable"


def _database() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone() == (1,)


def _cache() -> bool:
    cache.set("health:probe", 1, 5)
    return cache.get("health:probe") == 1


@require_GET
def health(request):
    """200 when the service can answer: every dependency it needs is reachable (the database, and the cache, which
    is Redis with REDIS_URL, where stop requests travel too). 503 otherwise: the requests that need a dependency that
    is down get 503s too."""
    checks = {"database": _state(_database), "cache": _state(_cache)}
    healthy = all(state == "ok" for state in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", **checks, "timestamp": timezone.now().isoformat()},
        status=200 if healthy else 503,
    )
