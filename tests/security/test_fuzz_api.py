"""Issue 15 verification: schemathesis fuzzes every operation of the REST API's own schema (/api/schema/) on a real
daphne as a superuser (who reaches every code path), with valid and invalid data; no answer may be a 5xx."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Examples per operation and mode: enough to reach every parameter, few enough to finish well under a minute.
EXAMPLES = 5


def test_rest_api_fuzz_gives_no_server_error(daphne_server, django_user_model, default_llm_config):
    admin = django_user_model.objects.create_superuser(username="fuzz", password="pw-fuzz-123")
    headers = {"Authorization": f"Token {Token.objects.create(user=admin).key}"}
    schema = schemathesis.openapi.from_url(f"{daphne_server.base_url}/api/schema/", headers=headers)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                case.call_and_validate(base_url=daphne_server.base_url, headers=headers, checks=[not_a_server_error])

            try:
                call()
            except Unsatisfiable:
                pass  # nothing invalid to send: an operation without parameters or body has no negative cases
            except Exception as exc:  # collect every operation's failure, then report them together
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert operations > 20
    assert not failures, "\n\n".join(failures)
