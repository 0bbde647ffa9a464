"""Settings for the test suite: the real settings with throwaway secrets and a fast password hasher."""
import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-secret-key-not-for-production")
os.environ.setdefault("FIELD_ENCRYPTION_KEY", "test-field-encryption-key")
# A loaded test machine is slow, not down: generous timeouts, so a stall is not taken for a dead dependency (the
# tests of dead dependencies kill them outright: refused connections fail at once whatever the timeout). Set in the
# environment, so that the daphne processes the tests start inherit them.
os.environ.setdefault("REDIS_CONNECT_TIMEOUT", "10")
os.environ.setdefault("REDIS_TIMEOUT", "10")
os.environ.setdefault("DATABASE_CONNECT_TIMEOUT", "10")

from opsagent.settings import *  # noqa: E402,F403

LLM_MAX_RETRIES = 0  # upstream faults surface at once; retries are the production default
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
MEDIA_ROOT = BASE_DIR / "var" / "test-media"  # noqa: F405
# WhiteNoise serves from the finders here and warns about a missing STATIC_ROOT ("No directory at"): give it an empty
# one instead of requiring collectstatic before the tests.
STATIC_ROOT = BASE_DIR / "var" / "test-static"  # noqa: F405
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# Every async test runs on its own event loop, and a checkpoint pool belongs to one loop: the suite connects per run
# unless a test (or a daphne process it starts, see tests/e2e/dify_servers.py) turns the pool on.
AGENT_CHECKPOINT_POOL_SIZE = int(os.environ.get("AGENT_CHECKPOINT_POOL_SIZE", "0"))

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # noqa: F405
    # The agent's checkpointer opens its own connection, which cannot see an in-memory test database: use a file
    # per test process instead.
    (BASE_DIR / "var").mkdir(exist_ok=True)  # noqa: F405
    DATABASES["default"].setdefault("TEST", {})["NAME"] = str(BASE_DIR / "var" / f"test-{os.getpid()}.sqlite3")  # noqa: F405
