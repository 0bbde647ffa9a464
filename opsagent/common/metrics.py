"""Prometheus metrics (GET /metrics): the series, the small calls that count into them where things happen, who may
read them, and their text.

Labels are bounded: surfaces, config names and routes (an admin creates those), statuses and error categories; never
a user, an end user, a key or an address. With PROMETHEUS_MULTIPROC_DIR set (before the process starts), every worker
writes its counts to files there and any worker's /metrics sums them all (the library's multiprocess mode); without
it, each process serves its own counts. The state of things (pool members' health, the database and the cache) is
read when scraped, from what every worker shares.
"""
from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal

from django.conf import settings
from django.http import HttpResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from opsagent.common.clients import client_ip
from opsagent.common.dependencies import dependency_states
from opsagent.common.request_log import request_current

# The series this process counts into (in multiprocess mode their values live in PROMETHEUS_MULTIPROC_DIR).
REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

CHAT_REQUESTS = Counter("opsagent_chat_requests", "Chat turns by surface, model route, config that answered and end "
                        "status (normal, stopped, paused, error).", ["surface", "route", "config", "status"],
                        registry=REGISTRY)
CHAT_DURATION = Histogram("opsagent_chat_request_duration_seconds", "Chat turn duration, from the run's start to its "
                          "end.", ["surface", "route", "config"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
CHAT_TTFT = Histogram("opsagent_chat_ttft_seconds", "Time from a chat turn's start to its first token.",
                      ["surface", "route", "config"], buckets=TTFT_BUCKETS, registry=REGISTRY)
TOKENS = Counter("opsagent_tokens", "Tokens of provider calls by kind (prompt, completion).",
                 ["route", "config", "kind"], registry=REGISTRY)
COST = Counter("opsagent_cost", "Cost of provider calls, in the config's currency.", ["route", "config", "currency"],
               registry=REGISTRY)
PROVIDER_CALLS = Counter("opsagent_provider_calls", "Provider calls (pool attempts) by outcome: ok or the error "
                         "category.", ["route", "config", "outcome"], registry=REGISTRY)
ACTIVE_STREAMS = Gauge("opsagent_active_streams", "Answers being streamed now, by surface.", ["surface"],
                       multiprocess_mode="livesum", registry=REGISTRY)
RATE_LIMIT_REFUSALS = Counter("opsagent_rate_limit_refusals", "Requests refused by a limit: an app's or key's limit "
                              "(requests_per_minute, tokens_per_day, ...), or a lock after failed authentications "
                              "(auth_lock, login_lock).", ["scope", "limit"], registry=REGISTRY)

# Functions that yield the metric families of shared state, read when scraped (apps add theirs in ready()).
_state_sources: list[Callable[[], Iterable[Metric]]] = []


def state_source_register(source: Callable[[], Iterable[Metric]]) -> None:
    if source not in _state_sources:
        _state_sources.append(source)


def _enabled() -> bool:
    return settings.METRICS_ENABLED


# ----- counting (cheap: no I/O; a few label look-ups) -----

def chat_request_observe(*, config_name: str, route: str, app: str, task_id: str, status: str, latency: float,
                         ttft: float | None, prompt_tokens: int, completion_tokens: int, cost: Decimal | None,
                         currency: str) -> None:
    """A turn ended: count it under the current request's surface, and tell the request's log line about it."""
    record = request_current()
    if record is not None:
        record.config, record.app, record.task_id, record.outcome = config_name, app, task_id, status
        record.ttft_ms = round(ttft * 1000, 1) if ttft is not None else None
    if not _enabled():
        return
    surface = record.surface if record is not None else "other"
    CHAT_REQUESTS.labels(surface, route, config_name, status).inc()
    CHAT_DURATION.labels(surface, route, config_name).observe(latency)
    if ttft is not None:
        CHAT_TTFT.labels(surface, route, config_name).observe(ttft)
    if prompt_tokens:
        TOKENS.labels(route, config_name, "prompt").inc(prompt_tokens)
    if completion_tokens:
        TOKENS.labels(route, config_name, "completion").inc(completion_tokens)
    if cost:
        COST.labels(route, config_name, currency).inc(float(cost))


def provider_call_observe(*, config_name: str, route: str, category: str) -> None:
    """One call to a pool member: `category` is its error category, "" when it answered."""
    if _enabled():
        PROVIDER_CALLS.labels(route, config_name, category or "ok").inc()


def rate_limit_refusal_observe(*, scope: str, limit: str) -> None:
    """A request refused by a limit (`scope`: app, key or client; `limit`: the limit's name)."""
    if _enabled():
        RATE_LIMIT_REFUSALS.labels(scope, limit).inc()


@contextmanager
def stream_active(surface: str) -> Iterator[None]:
    """An answer streaming on `surface` for the time of the block."""
    if not _enabled():
        yield
        return
    gauge = ACTIVE_STREAMS.labels(surface)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


# ----- reading -----

def _dependency_families() -> Iterable[Metric]:
    family = GaugeMetricFamily("opsagent_dependency_up", "1 when the dependency answers (database, cache).",
                               labels=["dependency"])
    for name, state in dependency_states().items():
        family.add_metric([name], 1.0 if state == "ok" else 0.0)
    yield family


class _StateCollector:
    def collect(self) -> Iterable[Metric]:
        yield from _dependency_families()
        for source in _state_sources:
            yield from source()


def metrics_text() -> bytes:
    """Every series in the text format: this process's or, in multiprocess mode, all workers' summed; then the
    state read now."""
    registry = CollectorRegistry()
    if settings.PROMETHEUS_MULTIPROC_DIR:
        MultiProcessCollector(registry, path=settings.PROMETHEUS_MULTIPROC_DIR)
        counted = generate_latest(registry)
    else:
        counted = generate_latest(REGISTRY)
    state = CollectorRegistry()
    state.register(_StateCollector())
    return counted + generate_latest(state)


def _plain(status: int, text: str, **headers: str) -> HttpResponse:
    response = HttpResponse(text + "\n", status=status, content_type="text/plain; charset=utf-8")
    for name, value in headers.items():
        response[name] = value
    return response


# Headers a proxy adds when it relays a request: a request carrying one did not come from this host's own scraper.
_FORWARDED = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def metrics_refusal(request) -> HttpResponse | None:
    """Why `request` may not read the metrics (a plain-text 401, 403 or 404), or None when it may: with METRICS_TOKEN,
    its bearer token (compared in constant time); without it, a loopback client that no proxy relayed."""
    if not settings.METRICS_ENABLED:
        return _plain(404, "Not found.")
    token = settings.METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return _plain(401, "A bearer token is required.", **{"WWW-Authenticate": 'Bearer realm="metrics"'})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return _plain(403, "The token is not valid.")
        return None
    # Relayed by a trusted proxy, the client is the address it forwarded (client_ip); by any other, unknown.
    relayed = any(request.META.get(name) for name in _FORWARDED)
    trusted = request.META.get("REMOTE_ADDR") in settings.TRUSTED_PROXY_IPS and request.META.get("HTTP_X_FORWARDED_FOR")
    if (relayed and not trusted) or not _is_loopback(client_ip(request)):
        return _plain(403, "Metrics are served to loopback clients only; set METRICS_TOKEN to scrape from elsewhere.")
    return None


def metrics_response() -> HttpResponse:
    return HttpResponse(metrics_text(), content_type=CONTENT_TYPE_LATEST)
