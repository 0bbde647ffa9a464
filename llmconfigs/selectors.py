"""Reads of LLM configurations: cached hot-path lookups and the per-turn model selection."""
from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from django.core.cache import cache
from django.db.models import Q, QuerySet
from django.db.models.base import ModelState

from llmconfigs.errors import ConfigInactive, ConfigNotFound, ConfigWrongKind, NoUsableConfig
from llmconfigs.models import AuditLog, LLMConfig, LLMConfigVersion
from llmconfigs.routing import pool_order
from opsagent.common.cache import cache_get, cache_get_many

CACHE_TTL = 300
_GENERATION_KEY = "llmconfig:generation"
_MISSING = "missing"


def llm_config_list(*, is_active: bool | None = None, is_embedding: bool | None = None, provider: str | None = None,
                    search: str | None = None) -> QuerySet[LLMConfig]:
    """Configs for listing: the key column is never read (the stored mask is shown instead)."""
    qs = LLMConfig.objects.defer("api_key")
    if is_active is not None:
        qs = qs.filter(is_active=is_active)
    if is_embedding is not None:
        qs = qs.filter(is_embedding=is_embedding)
    if provider:
        qs = qs.filter(provider=provider)
    if search:
        qs = qs.filter(Q(name__icontains=search) | Q(model_name__icontains=search) | Q(description__icontains=search))
    return qs.order_by("-is_default", "name")


# ----- cache: snapshots keyed by a generation number that every change bumps -----

def llm_config_cache_keys() -> list[str]:
    """The shared cache entries a config lookup reads first, for a caller that reads them ahead with its own
    (opsagent.common.cache.cache_read_ahead)."""
    return [_GENERATION_KEY]


def _generation() -> int:
    generation = cache_get(_GENERATION_KEY)
    if generation is None:
        cache.add(_GENERATION_KEY, _generation_start(), None)
        generation = cache.get(_GENERATION_KEY) or _generation_start()
    return generation


def _generation_start() -> int:
    """The first generation of a cache that has none (new, flushed, evicted): never one an earlier life of the cache
    used, so that no process takes what it built then (see _built) for the current entries."""
    return time.time_ns() // 1000


def llm_config_cache_invalidate() -> None:
    """Forget every cached config (called by the services after each committed change)."""
    try:
        cache.incr(_GENERATION_KEY)
    except ValueError:
        cache.set(_GENERATION_KEY, _generation_start(), None)


def _to_cache(config: LLMConfig) -> dict[str, Any]:
    # The key is cached in its encrypted form only: a shared cache (Redis) never holds a plaintext key.
    field = LLMConfig._meta.get_field("api_key")
    data = {f.attname: getattr(config, f.attname) for f in LLMConfig._meta.concrete_fields if f.name != "api_key"}
    data["api_key"] = field._dump(config.api_key)
    return data


def _from_cache(data: dict[str, Any]) -> LLMConfig:
    field = LLMConfig._meta.get_field("api_key")
    values = dict(data)
    values["api_key"] = field._load(values["api_key"])
    config = LLMConfig(**values)
    config._state.adding = False
    config._state.db = "default"
    return config


# The generation this process saw last. A lookup asks the shared cache for the current generation and for the entry
# under this one in a single round trip (Redis): while no config changes, which is nearly always, that is the answer.
_last_generation: int | None = None

# The configs this process built from the entries of that generation, by entry key. An entry never changes within a
# generation (every change of a config bumps it), so a lookup that finds its key here asks the cache for the
# generation alone, and neither unpickles a row, builds a model from it nor decrypts its key again (together about
# half a millisecond of CPU per config on every turn). Emptied whenever the generation moves or is lost (a flushed
# cache starts again at 1), and bounded: names a client asks for are cached too, found or not.
_built: dict[str, Any] = {}
BUILT_LIMIT = 1024


def _fresh(config: LLMConfig) -> LLMConfig:
    """A copy of a built config for one caller (callers may set attributes on what they get): its fields without
    running the model's __init__ again, as unpickling a model does."""
    copy = LLMConfig.__new__(LLMConfig)
    copy.__dict__.update(config.__dict__)
    copy._state = ModelState()
    copy._state.adding = False
    copy._state.db = config._state.db
    return copy


def _handed_out(built: Any) -> Any:
    if built is None:
        return None
    return [_fresh(config) for config in built] if isinstance(built, list) else _fresh(built)


# Inside llm_config_snapshot: the generation its first lookup found (empty until then).
_snapshot: ContextVar[list[int] | None] = ContextVar("llm_config_snapshot", default=None)


@contextlib.contextmanager
def llm_config_snapshot() -> Iterator[None]:
    """The config lookups inside see one generation: the first asks the shared cache for it, the others take what
    this process built for it without a round trip (a turn's preparation looks up its config and pool several
    times, each a round trip with Redis). For one request's work in one hop: a change committed meanwhile is seen
    by the next lookup outside, as if the request had come a moment earlier. Nested snapshots are the outer one."""
    if _snapshot.get() is not None:
        yield
        return
    token = _snapshot.set([])
    try:
        yield
    finally:
        _snapshot.reset(token)


def _cached(key: str, load) -> Any:
    """The config (or list of configs) `load` returns, kept in the shared cache under the current generation."""
    global _last_generation
    pinned = _snapshot.get()
    if pinned and (memo_key := f"llmconfig:{pinned[0]}:{key}") in _built:
        return _handed_out(_built[memo_key])
    guess = _last_generation
    if guess is not None and (memo_key := f"llmconfig:{guess}:{key}") in _built:
        if cache_get(_GENERATION_KEY) == guess:
            if pinned is not None:
                pinned[:] = [guess]
            return _handed_out(_built[memo_key])
        _built.clear()
        entries = {}
    else:
        entries = cache_get_many([_GENERATION_KEY, f"llmconfig:{guess}:{key}"]) if guess is not None else {}
    generation = entries.get(_GENERATION_KEY)
    if generation is None:  # lost (an evicted or flushed cache): what this process built may be of another life
        _built.clear()
        generation = _generation()
    elif generation != guess:
        _built.clear()
    _last_generation = generation
    if pinned is not None:
        pinned[:] = [generation]
    full_key = f"llmconfig:{generation}:{key}"
    hit = entries.get(full_key) if generation == guess else cache_get(full_key)
    if hit == _MISSING:
        built = None
    elif isinstance(hit, list):
        built = [_from_cache(item) for item in hit]
    elif hit is not None:
        built = _from_cache(hit)
    else:
        loaded = load()
        if isinstance(loaded, list):
            cache.set(full_key, [_to_cache(config) for config in loaded], CACHE_TTL)
        else:
            cache.set(full_key, _to_cache(loaded) if loaded else _MISSING, CACHE_TTL)
        built = loaded
    if len(_built) >= BUILT_LIMIT:
        _built.clear()
    _built[full_key] = built
    return _handed_out(built)


def llm_config_get(*, config_id: uuid.UUID | str) -> LLMConfig | None:
    """One config by id, from the cache when possible."""
    try:
        config_uuid = uuid.UUID(str(config_id))
    except ValueError:
        return None
    return _cached(f"id:{config_uuid}", lambda: LLMConfig.objects.filter(pk=config_uuid).first())


def llm_config_default(*, is_embedding: bool = False) -> LLMConfig | None:
    kind = "embedding" if is_embedding else "chat"
    return _cached(
        f"default:{kind}",
        lambda: LLMConfig.objects.filter(is_default=True, is_active=True, is_embedding=is_embedding).first(),
    )


def _usable(config: LLMConfig, *, source: str) -> LLMConfig:
    if config.is_embedding:
        raise ConfigWrongKind(f"LLM config {config.name!r} ({source}) is an embedding config and cannot chat.")
    if not config.is_active:
        raise ConfigInactive(f"LLM config {config.name!r} ({source}) is inactive.")
    return config


def llm_route_names() -> list[str]:
    """Every route a chat config serves (active or not): the models an app's allow-list may name."""
    rows = LLMConfig.objects.filter(is_embedding=False).values_list("route", "model_name")
    return sorted({route or model_name for route, model_name in rows})


def llm_pool_members(*, route: str) -> list[LLMConfig]:
    """The active chat configs serving `route` (their route, or their model name when the route is blank)."""
    return _cached(f"pool:{route}", lambda: list(_pool_queryset(route)))


def _pool_queryset(route: str) -> QuerySet[LLMConfig]:
    return LLMConfig.objects.filter(_serving(route), is_active=True, is_embedding=False).order_by("-priority", "name")


def _serving(route: str) -> Q:
    """Configs serving `route`: theirs, or their model name when their route is blank."""
    return Q(route=route) | Q(route="", model_name=route)


def _default_pool_load() -> list[LLMConfig]:
    """The default chat config's pool (one cache entry, so that a turn on the default costs one lookup)."""
    default = LLMConfig.objects.filter(is_default=True, is_active=True, is_embedding=False).first()
    if default is None:
        return []
    return list(_pool_queryset(default.route_name))


def llm_pool_resolve(
    *,
    config_id: uuid.UUID | str | None = None,
    model: str | None = None,
    session_config_id: uuid.UUID | str | None = None,
    app_config_id: uuid.UUID | str | None = None,
) -> list[LLMConfig]:
    """The chat configs that may answer a turn, in the order to try them (see llmconfigs.routing.pool_order).

    Choice: explicit id > model (a config name, else a route) > session > app > the default config's pool. A config
    chosen by id or name goes first, the rest of its pool after it."""
    first: LLMConfig | None = None
    if config_id:
        first = llm_config_get(config_id=config_id)
        if first is None:
            raise ConfigNotFound(f"LLM config {config_id} does not exist.", field="model_config_id")
        try:
            _usable(first, source="model_config_id")
        except (ConfigInactive, ConfigWrongKind) as exc:
            exc.field = "model_config_id"
            raise
    elif model:
        model = model.strip()
        if not model:
            raise ConfigNotFound("model must not be empty.", field="model")
        first = _cached(f"name:{model}", lambda: LLMConfig.objects.filter(name=model).first())
        if first is not None:
            _usable(first, source="model")
        else:
            members = llm_pool_members(route=model)
            if members:
                return pool_order(members)
            if LLMConfig.objects.filter(_serving(model), is_embedding=False).exists():
                raise ConfigInactive(f"Every LLM config serving model {model!r} is inactive.", field="model")
            raise ConfigNotFound(f"No LLM config named or serving model {model!r}.", field="model")
    else:
        for source, candidate in (("conversation", session_config_id), ("app", app_config_id)):
            if candidate:
                first = llm_config_get(config_id=candidate)
                if first is not None:
                    _usable(first, source=source)
                    break
    if first is None:
        members = _cached("default-pool", _default_pool_load)
        if not members:
            raise NoUsableConfig(
                "No LLM is configured: add an active chat config and set it as the default in the admin "
                "(or run `manage.py seed` with LLM_TYPE/LLM_API_KEY/LLM_MODEL)."
            )
        return pool_order(members)
    return pool_order(llm_pool_members(route=first.route_name), first=first)


def llm_config_resolve(**choice: Any) -> LLMConfig:
    """The config a turn would try first (see llm_pool_resolve): for checks made before the turn runs."""
    return llm_pool_resolve(**choice)[0]


def audit_log_list(*, action: str | None = None, target_type: str | None = None,
                   target_id: str | None = None) -> QuerySet[AuditLog]:
    qs = AuditLog.objects.all()
    if action:
        qs = qs.filter(action=action)
    if target_type:
        qs = qs.filter(target_type=target_type)
    if target_id:
        qs = qs.filter(target_id=target_id)
    return qs.order_by("-created_at", "-id")


def llm_config_versions(*, config: Any) -> list[dict[str, Any]]:
    """The config's versions, newest first, each with what changed since the one before it. The key column is not
    read: a version says only whether its key differs from the previous one ("changed"/"unchanged")."""
    rows = list(LLMConfigVersion.objects.filter(config=config).defer("api_key").order_by("number"))
    result, previous = [], None
    for row in rows:
        diff = {}
        if previous is not None:
            for name in sorted(set(previous.fields) | set(row.fields)):
                if previous.fields.get(name) != row.fields.get(name):
                    diff[name] = {"old": previous.fields.get(name), "new": row.fields.get(name)}
        result.append({
            "number": row.number, "created_at": row.created_at, "actor": row.actor_id, "actor_repr": row.actor_repr,
            "source": row.source, "action": row.action, "rolled_back_from": row.rolled_back_from,
            "fields": row.fields, "api_key": "changed" if row.key_changed else "unchanged", "diff": diff,
        })
        previous = row
    result.reverse()
    return result
