"""The attack suite (issue 15): each test performs one attack against a real daphne and asserts the safe outcome.
The daphne fixtures are the end-to-end suite's own."""
import pytest
from django.db import connection

from tests.e2e.conftest import chromium, daphne_server, start_daphne  # noqa: F401


@pytest.fixture(autouse=True)
def _postgres_only(request):
    """Tests marked `postgres` are skipped on SQLite runs."""
    if request.node.get_closest_marker("postgres") and connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL")
