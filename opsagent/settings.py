"""Settings for OpsAgent, read from the environment (django-environ); a `.env` file only when asked to.

Grouped by concern, each group under a header. Only what differs from Django's defaults is set here; every setting
the code reads that Django does not define is declared here (tests/test_settings.py checks it). docs/configuration.md
lists the environment variables."""
from pathlib import Path

import environ
from cryptography.hazmat.primitives import hashes
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if env.bool("DJANGO_READ_DOT_ENV_FILE", default=False):
    env.read_env(str(BASE_DIR / ".env"))

# ===== Debug, secrets and field encryption =====
DEBUG = env.bool("DJANGO_DEBUG", default=False)

SECRET_KEY = env("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Set it in the environment (or run `make run`, which writes a local .env)."
        )
    SECRET_KEY = "insecure-development-only-secret-key"

# The key for encrypted model fields (LLM API keys, MCP secrets). Deliberately separate from SECRET_KEY so that
# rotating one does not make the other's data unreadable.
FIELD_ENCRYPTION_KEY = env("FIELD_ENCRYPTION_KEY", default="")
if not FIELD_ENCRYPTION_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "FIELD_ENCRYPTION_KEY is not set. OpsAgent refuses to start without the key that encrypts stored API "
            "keys. Generate one (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`) and keep it: "
            "stored keys cannot be decrypted without it."
        )
    FIELD_ENCRYPTION_KEY = "insecure-development-only-field-key"
CRYPTOGRAPHY_KEY = FIELD_ENCRYPTION_KEY
CRYPTOGRAPHY_SALT = "opsagent.encrypted-fields"
# The digest that derives the encryption keys from FIELD_ENCRYPTION_KEY (llmconfigs.encryption): stored keys are
# readable only with the same one, so it is fixed here rather than left to django-cryptography's default.
CRYPTOGRAPHY_DIGEST = hashes.SHA256()

# ===== Applications, middleware, URLs and templates =====
DJANGO_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
]
THIRD_PARTY_APPS = [
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
]
LOCAL_APPS = [
    "opsagent",
    "llmconfigs",
    "agentcore",
    "difyapi",
]
INSTALLED_APPS = DJANGO_APPS + THIRD_PARTY_APPS + LOCAL_APPS

MIDDLEWARE = [
    "opsagent.common.middleware.RequestLogMiddleware",
    "opsagent.common.dependencies.DependencyFailureMiddleware",
    "opsagent.common.middleware.QueryTextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "opsagent.common.middleware.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "opsagent.urls"
ASGI_APPLICATION = "opsagent.asgi.application"
WSGI_APPLICATION = "opsagent.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# ===== Our dependencies failing (PostgreSQL, Redis): timeouts and the circuit breaker =====
# When dependencies fail (opsagent/common/dependencies.py): how long a connection attempt may take, and how long a
# dependency found down fails requests at once (503) before one request tries it again.
DATABASE_CONNECT_TIMEOUT = env.int("DATABASE_CONNECT_TIMEOUT", default=2)
REDIS_CONNECT_TIMEOUT = env.float("REDIS_CONNECT_TIMEOUT", default=1.0)
# A command's reply: longer, since a busy Redis (or a loaded host) can stall for a second without being down.
REDIS_TIMEOUT = env.float("REDIS_TIMEOUT", default=3.0)
DEPENDENCY_RETRY_SECONDS = env.float("DEPENDENCY_RETRY_SECONDS", default=2.0)

# ===== Database =====
# SQLite file in the project by default; DATABASE_URL=postgres://... in production.
# CONN_MAX_AGE=0: under ASGI each request runs in its own thread-sensitive context and persistent connections leak.
# No ATOMIC_REQUESTS (Django's default): views that stream cannot hold a transaction open.
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
DATABASES["default"]["CONN_MAX_AGE"] = 0
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Django's SQLite backend, keeping a few idle connections per process (opsagent/common/db/backends/sqlite3).
    DATABASES["default"]["ENGINE"] = "opsagent.common.db.backends.sqlite3"
    # WAL + a busy timeout let the ASGI server's threads and the agent's checkpointer share the file.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
         "pool_size": env.int("DATABASE_POOL_MAX_SIZE", default=4),
         # A transaction takes the write lock when it begins: one that read first and wrote later could not wait
         # for the lock (SQLite refuses the upgrade at once, "database is locked") and the request failed.
         "transaction_mode": "IMMEDIATE"}
    )
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's psycopg pool (compatible with CONN_MAX_AGE=0): each database_sync_to_async hop borrows an open
    # connection instead of opening one, which costs a few milliseconds on every hop of every request. The
    # project's backend (opsagent/common/db/backends/postgresql) adds the fast failure and recovery described below.
    DATABASES["default"]["ENGINE"] = "opsagent.common.db.backends.postgresql"
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("pool", {
        "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=2),
        "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=20),
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
        # A pool that cannot connect retries with a doubling delay for this long; the backend replaces the pool
        # when the database is back, so this only bounds the work of a pool left alone.
        "reconnect_timeout": DEPENDENCY_RETRY_SECONDS,
    })
    DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", DATABASE_CONNECT_TIMEOUT)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# ===== Cache and channel layers (Redis with REDIS_URL, in-process without) =====
REDIS_URL = env("REDIS_URL", default="")
if REDIS_URL:
    from redis.asyncio.retry import Retry as AsyncRedisRetry
    from redis.backoff import NoBackoff
    from redis.retry import Retry as RedisRetry

    # Short timeouts and no retries: redis-py retries a failed connection three times with a growing delay (a
    # second per cache call with Redis down); the circuit breaker decides when to try again.
    CACHES = {"default": {"BACKEND": "opsagent.common.cache.SharedPoolRedisCache", "LOCATION": REDIS_URL, "OPTIONS": {
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT, "socket_timeout": REDIS_TIMEOUT,
        "retry": RedisRetry(NoBackoff(), 0),
    }}}
    # channels-redis' layer (a group joined in one round trip). Its receive blocks on Redis for up to 5 s
    # (BZPOPMIN): its socket timeout is longer.
    CHANNEL_LAYERS = {"default": {"BACKEND": "opsagent.common.channel_layers.RedisGroupsChannelLayer", "CONFIG": {
        "hosts": [{"address": REDIS_URL, "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
                   "socket_timeout": 5 + REDIS_TIMEOUT, "retry": AsyncRedisRetry(NoBackoff(), 0)}],
    }}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "opsagent"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# ===== Sign-in and passwords =====
# The chat page's own login (any active user; the admin's admits staff only), and where it leads afterwards.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# ===== Time zone =====
TIME_ZONE = env("TIME_ZONE", default="UTC")

# ===== Static and uploaded files =====
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
MEDIA_ROOT = Path(env("MEDIA_ROOT", default=str(BASE_DIR / "media")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve the admin's static files straight from the apps so `make run` needs no collectstatic step.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# ===== REST API (/api) and its schema =====
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "opsagent.common.authentication.ThrottledTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["opsagent.common.parsers.BoundedJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "opsagent.common.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "opsagent.common.api_errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "OpsAgent API",
    "DESCRIPTION": "LLM configurations, agent sessions, tools, approvals and MCP servers.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api",
    # Swagger UI and Redoc served from the drf-spectacular-sidecar package, so /api/docs/ works without internet
    # access.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# ===== Logging =====
LOG_FORMAT = env("LOG_FORMAT", default="text")
LOG_LEVEL = env("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "opsagent.common.logging.JSONFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json" if LOG_FORMAT == "json" else "text"}
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "httpx": {"level": "WARNING"},
        # The openai SDK's HTTP client (pydantic's httpx fork): without this, a line per provider request at INFO,
        # written between the response's headers and its first token.
        "httpx2": {"level": "WARNING"},
        "openai": {"level": "WARNING"},
    },
}
# Requests slower than this are logged at WARNING by the request log middleware.
REQUEST_SLOW_SECONDS = env.float("REQUEST_SLOW_SECONDS", default=1.0)
# Prometheus metrics at /metrics (off: not counted, and /metrics is a 404). A scraper sends METRICS_TOKEN as a bearer
# token; without one, only clients on this host (loopback, not relayed by a proxy) may read them.
METRICS_ENABLED = env.bool("METRICS_ENABLED", default=True)
METRICS_TOKEN = env("METRICS_TOKEN", default="")
# Several worker processes: a directory (empty at start) where each writes its counts, so any of them serves the sum.
# prometheus_client reads it from the environment itself, before the first metric exists: set it there, not here.
PROMETHEUS_MULTIPROC_DIR = env("PROMETHEUS_MULTIPROC_DIR", default="")

# ===== Agent and models =====
# Runs of a dead process (heartbeat): a running answer's row gets `heartbeat_at` and the answer so far every
# AGENT_HEARTBEAT_SECONDS; one without a heartbeat for AGENT_STALE_RUN_SECONDS is dead (it no longer counts against
# an app's max_active_requests, and is marked failed keeping that answer).
AGENT_HEARTBEAT_SECONDS = env.float("AGENT_HEARTBEAT_SECONDS", default=3.0)
AGENT_STALE_RUN_SECONDS = env.float("AGENT_STALE_RUN_SECONDS", default=15.0)
# How often a process looks for such runs (when a turn starts, at most this often).
AGENT_STALE_SWEEP_SECONDS = env.float("AGENT_STALE_SWEEP_SECONDS", default=5.0)
# Checkpoint connections kept per process: a pool on PostgreSQL, one shared connection on SQLite (0: connect for
# every run).
AGENT_CHECKPOINT_POOL_SIZE = env.int("AGENT_CHECKPOINT_POOL_SIZE", default=10)

# Conversation memory and checkpoint storage (issue 15, item 10). The model is given the latest whole turns of a
# conversation that fit in both limits (counted with the current turn, which is always given whole); the
# checkpoint keeps only those, and a conversation's superseded checkpoints are deleted after each run. The Message
# table keeps the whole conversation for the history endpoints. Characters stand in for tokens (about 4 per token
# in English, 1 to 2 in Chinese).
AGENT_HISTORY_MAX_MESSAGES = env.int("AGENT_HISTORY_MAX_MESSAGES", default=100)
AGENT_HISTORY_MAX_CHARS = env.int("AGENT_HISTORY_MAX_CHARS", default=200_000)
LLM_REQUEST_TIMEOUT = env.float("LLM_REQUEST_TIMEOUT", default=120.0)
LLM_CONNECTION_TEST_TIMEOUT = env.float("LLM_CONNECTION_TEST_TIMEOUT", default=10.0)
LLM_MAX_RETRIES = env.int("LLM_MAX_RETRIES", default=2)
# Model pools (llmconfigs.routing): a member that answers 429, or fails LLM_COOLDOWN_FAILURES times within
# LLM_COOLDOWN_WINDOW seconds, leaves its pool's rotation for LLM_COOLDOWN_SECONDS (shared through the cache). A
# member with another member after it gets LLM_FIRST_TOKEN_TIMEOUT seconds to start answering before the request
# moves on.
LLM_COOLDOWN_FAILURES = env.int("LLM_COOLDOWN_FAILURES", default=3)
LLM_COOLDOWN_SECONDS = env.float("LLM_COOLDOWN_SECONDS", default=60.0)
LLM_COOLDOWN_WINDOW = env.float("LLM_COOLDOWN_WINDOW", default=60.0)
LLM_FIRST_TOKEN_TIMEOUT = env.float("LLM_FIRST_TOKEN_TIMEOUT", default=30.0)
# Annotation replies (difyapi.annotations): a chat query is embedded before the model is called, so a slow
# embedding provider delays every answer by at most this many seconds (then the model answers).
ANNOTATION_EMBEDDING_TIMEOUT = env.float("ANNOTATION_EMBEDDING_TIMEOUT", default=5.0)
# Usage reports (llmconfigs.usage): one row per provider call, written when the turn ends; `manage.py usage_rollup`
# rolls them up per hour and day and deletes the rolled-up rows older than USAGE_RETENTION_DAYS.
USAGE_RECORDING = env.bool("USAGE_RECORDING", default=True)
USAGE_RETENTION_DAYS = env.int("USAGE_RETENTION_DAYS", default=90)

# ===== Dify Service API (/v1): keep-alive pings and uploads =====
DIFY_PING_INTERVAL = env.float("DIFY_PING_INTERVAL", default=10.0)
# Approvals offered as Dify Human Input forms (difyapi.human_input): how long a form can be answered (never longer
# than its approval is pending), and how long the events of a run resumed by a form are kept for
# GET /v1/workflow/{id}/events to replay (in the cache).
DIFY_HUMAN_INPUT_FORM_TTL = env.int("DIFY_HUMAN_INPUT_FORM_TTL", default=24 * 3600)
DIFY_WORKFLOW_EVENTS_TTL = env.int("DIFY_WORKFLOW_EVENTS_TTL", default=3600)
UPLOAD_FILE_SIZE_LIMIT_MB = env.int("UPLOAD_FILE_SIZE_LIMIT", default=15)
UPLOAD_IMAGE_FILE_SIZE_LIMIT_MB = env.int("UPLOAD_IMAGE_FILE_SIZE_LIMIT", default=10)
UPLOAD_AUDIO_FILE_SIZE_LIMIT_MB = env.int("UPLOAD_AUDIO_FILE_SIZE_LIMIT", default=50)
UPLOAD_VIDEO_FILE_SIZE_LIMIT_MB = env.int("UPLOAD_VIDEO_FILE_SIZE_LIMIT", default=100)
WORKFLOW_FILE_UPLOAD_LIMIT = env.int("WORKFLOW_FILE_UPLOAD_LIMIT", default=10)
# Uploads (/v1/files/upload) per end user and per app within a sliding window; 0 switches a bound off.
UPLOAD_QUOTA_WINDOW_SECONDS = env.int("UPLOAD_QUOTA_WINDOW_SECONDS", default=24 * 3600)
UPLOAD_QUOTA_USER_FILES = env.int("UPLOAD_QUOTA_USER_FILES", default=100)
UPLOAD_QUOTA_USER_MB = env.int("UPLOAD_QUOTA_USER_MB", default=200)
UPLOAD_QUOTA_APP_FILES = env.int("UPLOAD_QUOTA_APP_FILES", default=10_000)
UPLOAD_QUOTA_APP_MB = env.int("UPLOAD_QUOTA_APP_MB", default=10_240)

# ===== Request sizes and brakes on guessing (opsagent/common/limits.py, opsagent/common/throttling.py) =====
# Every request body except an upload's (whose limit follows the upload size limits above) and every non-file field
# of a form.
REQUEST_BODY_MAX_BYTES = env.int("REQUEST_BODY_MAX_BYTES", default=1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = REQUEST_BODY_MAX_BYTES
WEBSOCKET_MESSAGE_MAX_BYTES = env.int("WEBSOCKET_MESSAGE_MAX_BYTES", default=1024 * 1024)
# Failed authentications (wrong app keys, API tokens, admin passwords) per client address: at the limit within the
# window, the address is refused (429) for one window, whatever it sends. 0 turns the limit off.
AUTH_FAILURE_LIMIT = env.int("AUTH_FAILURE_LIMIT", default=20)
AUTH_FAILURE_WINDOW_SECONDS = env.int("AUTH_FAILURE_WINDOW_SECONDS", default=300)
# Failed admin logins per username, from any address: at the limit, the username is locked for this long.
ADMIN_LOGIN_FAILURE_LIMIT = env.int("ADMIN_LOGIN_FAILURE_LIMIT", default=5)
ADMIN_LOGIN_LOCKOUT_SECONDS = env.int("ADMIN_LOGIN_LOCKOUT_SECONDS", default=900)
# Addresses of reverse proxies whose X-Forwarded-For is believed (empty: the connection's address is the client's).
TRUSTED_PROXY_IPS = env.list("TRUSTED_PROXY_IPS", default=[])

# ===== Input limits: bounds on what is inside a client's request, on every surface (docs/configuration.md) =====
# Any JSON a client sends (/v1 and /api bodies, WebSocket frames) may nest at most this deep.
JSON_MAX_DEPTH = env.int("JSON_MAX_DEPTH", default=32)
# A chat query (/v1 `query`, /api and WebSocket `message`), in characters.
QUERY_MAX_LENGTH = env.int("QUERY_MAX_LENGTH", default=100_000)
# A chat's or session's `inputs`: compact JSON size, keys (counted at every level), key and string lengths, depth.
INPUTS_MAX_BYTES = env.int("INPUTS_MAX_BYTES", default=64 * 1024)
INPUTS_MAX_KEYS = env.int("INPUTS_MAX_KEYS", default=100)
INPUTS_MAX_KEY_LENGTH = env.int("INPUTS_MAX_KEY_LENGTH", default=255)
INPUTS_MAX_VALUE_LENGTH = env.int("INPUTS_MAX_VALUE_LENGTH", default=32 * 1024)
INPUTS_MAX_DEPTH = env.int("INPUTS_MAX_DEPTH", default=5)
# Messages in one POST /v1/chat/completions (the OpenAI-compatible surface; its body size is bounded too).
OPENAI_MESSAGES_MAX = env.int("OPENAI_MESSAGES_MAX", default=1000)
# Feedback text on a message (/v1 `content`), in characters.
FEEDBACK_CONTENT_MAX_LENGTH = env.int("FEEDBACK_CONTENT_MAX_LENGTH", default=10_000)

# ===== Hosts, security headers and HTTPS =====
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])
# Django's defaults already send nosniff (SECURE_CONTENT_TYPE_NOSNIFF), X-Frame-Options DENY and
# Cross-Origin-Opener-Policy same-origin on every response. Uploaded files carry a stricter policy of their own
# (difyapi.views).
SECURE_REFERRER_POLICY = env("DJANGO_SECURE_REFERRER_POLICY", default="same-origin")
# Pages load scripts, styles, images and fonts from this origin only (the admin, the Swagger page at /api/docs/);
# no inline script or style, no plugins, no framing, forms post back here. Empty turns the header off.
CONTENT_SECURITY_POLICY = env(
    "DJANGO_CONTENT_SECURITY_POLICY",
    default="default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
)
# HTTPS: all off by default, so `make run` serves plain http on 127.0.0.1; production behind TLS turns them on
# (`manage.py check --deploy` is clean only then). See docs/deployment.md.
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=False)
# Load balancer probes may stay on plain http.
SECURE_REDIRECT_EXEMPT = env.list("DJANGO_SECURE_REDIRECT_EXEMPT", default=[r"^health/$"])
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=False)
SESSION_COOKIE_SECURE = env.bool("DJANGO_SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("DJANGO_CSRF_COOKIE_SECURE", default=False)
# "HEADER,value" of a proxy that terminates TLS and overwrites that header on every request, e.g.
# "HTTP_X_FORWARDED_PROTO,https". Unset: only the connection itself says whether a request is secure.
SECURE_PROXY_SSL_HEADER = tuple(env.list("DJANGO_SECURE_PROXY_SSL_HEADER", default=[])) or None
if SECURE_PROXY_SSL_HEADER is not None and len(SECURE_PROXY_SSL_HEADER) != 2:
    raise ImproperlyConfigured('DJANGO_SECURE_PROXY_SSL_HEADER is "HEADER,value", e.g. "HTTP_X_FORWARDED_PROTO,https".')
