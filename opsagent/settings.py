"""Settings for OpsAgent, read from the environment (django-environ); a `.env` file only when asked to."""
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if env.bool("DJANGO_READ_DOT_ENV_FILE", default=False):
    env.read_env(str(BASE_DIR / ".env"))

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

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

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
    "opsagent.middleware.RequestLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
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

# Database: SQLite file in the project by default; DATABASE_URL=postgres://... in production.
# CONN_MAX_AGE=0: under ASGI each request runs in its own thread-sensitive context and persistent connections leak.
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
DATABASES["default"]["CONN_MAX_AGE"] = 0
DATABASES["default"]["ATOMIC_REQUESTS"] = False
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Django's SQLite backend, keeping a few idle connections per process (opsagent/db/backends/sqlite3).
    DATABASES["default"]["ENGINE"] = "opsagent.db.backends.sqlite3"
    # WAL + a busy timeout let the ASGI server's threads and the agent's checkpointer share the file.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
         "pool_size": env.int("DATABASE_POOL_MAX_SIZE", default=4)}
    )
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's psycopg pool (compatible with CONN_MAX_AGE=0): each database_sync_to_async hop borrows an open
    # connection instead of opening one, which costs a few milliseconds on every hop of every request.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("pool", {
        "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=2),
        "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=20),
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
    })
DATABASES["default"].setdefault("TEST", {})
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "opsagent.cache.SharedPoolRedisCache", "LOCATION": REDIS_URL}}
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "opsagent"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

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

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_PAGINATION_CLASS": "opsagent.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "OpsAgent API",
    "DESCRIPTION": "LLM configurations, agent sessions, tools, approvals and MCP servers.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api",
}

LOG_FORMAT = env("LOG_FORMAT", default="text")
LOG_LEVEL = env("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "opsagent.logging.JSONFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json" if LOG_FORMAT == "json" else "text"}
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "httpx": {"level": "WARNING"},
        "openai": {"level": "WARNING"},
    },
}
# Requests slower than this are logged at WARNING by the request log middleware.
REQUEST_SLOW_SECONDS = env.float("REQUEST_SLOW_SECONDS", default=1.0)

# Agent
AGENT_HTTP_CHECK_ALLOW_PRIVATE = env.bool("AGENT_HTTP_CHECK_ALLOW_PRIVATE", default=False)
# Documents given by URL (Dify remote_url files) are fetched from public addresses only unless this is set.
REMOTE_FILES_ALLOW_PRIVATE = env.bool("REMOTE_FILES_ALLOW_PRIVATE", default=False)
AGENT_STALE_RUN_SECONDS = env.int("AGENT_STALE_RUN_SECONDS", default=120)
# How often a process looks for such runs (when a turn starts, at most this often).
AGENT_STALE_SWEEP_SECONDS = env.float("AGENT_STALE_SWEEP_SECONDS", default=10.0)
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

# Dify Service API
DIFY_PING_INTERVAL = env.float("DIFY_PING_INTERVAL", default=10.0)
UPLOAD_FILE_SIZE_LIMIT_MB = env.int("UPLOAD_FILE_SIZE_LIMIT", default=15)
UPLOAD_IMAGE_FILE_SIZE_LIMIT_MB = env.int("UPLOAD_IMAGE_FILE_SIZE_LIMIT", default=10)
UPLOAD_AUDIO_FILE_SIZE_LIMIT_MB = env.int("UPLOAD_AUDIO_FILE_SIZE_LIMIT", default=50)
UPLOAD_VIDEO_FILE_SIZE_LIMIT_MB = env.int("UPLOAD_VIDEO_FILE_SIZE_LIMIT", default=100)
WORKFLOW_FILE_UPLOAD_LIMIT = env.int("WORKFLOW_FILE_UPLOAD_LIMIT", default=10)
DATA_UPLOAD_MAX_MEMORY_SIZE = 110 * 1024 * 1024

if not DEBUG:
    SESSION_COOKIE_HTTPONLY = True
    X_FRAME_OPTIONS = "DENY"
LLM_MAX_RETRIES = env.int("LLM_MAX_RETRIES", default=2)

# Swagger UI and Redoc served from the drf-spectacular-sidecar package, so /api/docs/ works without internet access.
SPECTACULAR_SETTINGS.update(
    {"SWAGGER_UI_DIST": "SIDECAR", "SWAGGER_UI_FAVICON_HREF": "SIDECAR", "REDOC_DIST": "SIDECAR"}
)
