"""The attack suite (issue 15): each test performs one attack against a real daphne and asserts the safe outcome.
The daphne fixtures are the end-to-end suite's own."""
from tests.e2e.conftest import daphne_server, start_daphne  # noqa: F401
